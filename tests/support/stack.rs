//! A containerd + registry + moto stack and the CRI calls tests make on it.

use ecr_pull_proxy::cri::{self, image_service_client::ImageServiceClient};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::real::{Containerd, ContainerdVersion, Moto, Registry, MOTO_PASSWORD};
use super::{ProxyOptions, ProxyProcess};

pub const ECR_HOST: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
pub const LOOK_ALIKE: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example";
pub const CALLER_PASSWORD: &str = "caller-wrong-password-5f3a";

/// containerd, a registry and moto, each with its own temporary state.
pub struct Stack {
    /// The temporary directory holding everything.
    pub dir: tempfile::TempDir,
    /// The registry (user `AWS`).
    pub registry: Registry,
    /// containerd, with `hosts.toml` for the stack's hosts.
    pub containerd: Containerd,
    /// The ECR API emulator.
    pub moto: Moto,
}

impl Stack {
    /// containerd + registry + moto; every host in `hosts` (and the
    /// registry's own address) is served by the registry.
    pub fn start(hosts: &[&str]) -> Stack {
        Self::with_password(hosts, MOTO_PASSWORD)
    }

    /// As `start`, on containerd `version`.
    pub fn on(version: ContainerdVersion, hosts: &[&str]) -> Stack {
        Self::build(hosts, MOTO_PASSWORD, None, version)
    }

    /// As `start`, with containerd's CRI config naming `sandbox_image` as
    /// its pause image.
    pub fn with_sandbox_image(hosts: &[&str], sandbox_image: &str) -> Stack {
        Self::build(
            hosts,
            MOTO_PASSWORD,
            Some(sandbox_image),
            ContainerdVersion::One,
        )
    }

    /// As `with_sandbox_image`, on containerd `version`.
    pub fn with_sandbox_image_on(
        version: ContainerdVersion,
        hosts: &[&str],
        sandbox_image: &str,
    ) -> Stack {
        Self::build(hosts, MOTO_PASSWORD, Some(sandbox_image), version)
    }

    /// As `start`, with a registry that accepts `AWS`/`password`.
    pub fn with_password(hosts: &[&str], password: &str) -> Stack {
        Self::build(hosts, password, None, ContainerdVersion::One)
    }

    fn build(
        hosts: &[&str],
        password: &str,
        sandbox_image: Option<&str>,
        version: ContainerdVersion,
    ) -> Stack {
        let dir = super::short_tempdir();
        let moto = Moto::start(dir.path());
        let registry = Registry::start(dir.path(), "AWS", password);
        let mut mirrors: Vec<(&str, &str)> =
            hosts.iter().map(|h| (*h, registry.addr.as_str())).collect();
        mirrors.push((registry.addr.as_str(), registry.addr.as_str()));
        let containerd = Containerd::start_version(dir.path(), &mirrors, sandbox_image, version);
        Stack {
            dir,
            registry,
            containerd,
            moto,
        }
    }

    pub fn proxy(&self, name: &str, config: &str) -> ProxyProcess {
        self.proxy_with_env(name, config, self.moto.env())
    }

    pub fn proxy_with_env_args(
        &self,
        name: &str,
        config: &str,
        env: Vec<(&'static str, String)>,
        args: Vec<&'static str>,
    ) -> ProxyProcess {
        let pdir = self.dir.path().join(name);
        std::fs::create_dir_all(&pdir).unwrap();
        ProxyProcess::start(
            &pdir,
            &self.containerd.socket,
            ProxyOptions {
                config: Some(config),
                env,
                args,
                ..Default::default()
            },
        )
    }

    pub fn proxy_with_env(
        &self,
        name: &str,
        config: &str,
        env: Vec<(&'static str, String)>,
    ) -> ProxyProcess {
        self.proxy_with_env_args(name, config, env, vec![])
    }

    pub fn direct(&self) -> Channel {
        super::channel(&self.containerd.socket)
    }
}

pub fn client(channel: Channel) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(channel).max_decoding_message_size(super::MAX_MESSAGE)
}

pub async fn pull(
    channel: Channel,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, Status> {
    let req = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        auth,
        sandbox_config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "pod".into(),
                uid: "uid".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            ..Default::default()
        }),
    };
    let result = client(channel)
        .pull_image(req)
        .await
        .map(|r| r.into_inner().image_ref);
    // Every status a caller receives.
    if let Err(e) = &result {
        super::secrets::assert_none_in("a PullImage status", e.message());
    }
    result
}

pub async fn remove(channel: Channel, image: &str) {
    let spec = cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    };
    client(channel)
        .remove_image(cri::RemoveImageRequest { image: Some(spec) })
        .await
        .unwrap();
}

pub fn creds(user: &str, password: &str) -> Option<cri::AuthConfig> {
    Some(cri::AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    })
}

/// The pull failed with containerd's own 401, which carries no secret.
pub fn assert_refused(result: Result<String, Status>) -> Status {
    let err = result.expect_err("pull should be refused");
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(
        err.message().contains("401 Unauthorized"),
        "{}",
        err.message()
    );
    assert_no_secret_in(err.message());
    err
}

/// No secret of any stack appears in `text`: the one list in
/// [`super::secrets`] (the node's AWS secret key, the caller's password and
/// its base64 `auth` form, every ECR token and password, the instance
/// role's keys, external ids, and every key and session token moto's STS
/// has issued).
pub fn assert_no_secret_in(text: &str) {
    super::secrets::assert_none_in("the text", text);
}

/// The proxy's log, at its most verbose level, holds no secret.
pub fn assert_no_secrets(logs: &str) {
    assert_no_secret_in(logs);
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "logs were not at the most verbose level"
    );
}
