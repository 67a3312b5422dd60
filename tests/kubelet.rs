//! kubelet itself, the caller the daemon exists for: kubelet v1.37.2
//! (built by `.ci/install` from the Go module proxy) run standalone, with
//! a static pod whose image and pause image live only in the private
//! "ECR" registry (moto's token opens it), against real containerd.
//!
//! Every behaviour is read from what kubelet and containerd report:
//! kubelet's own log, and the pod's containers as containerd's CRI lists
//! them (crictl against containerd's socket, not the daemon's).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::real::{ContainerdVersion, MOTO_PASSWORD};
use support::stack::*;

/// The kubelets `.ci/install` builds: the newest, and the newest before
/// 1.31 (whose CRI client sends the socket path, percent-encoded, as
/// `:authority`).
#[derive(Clone, Copy, Debug)]
enum Version {
    V1_37,
    V1_30,
}

impl Version {
    fn binary(self) -> &'static str {
        match self {
            Version::V1_37 => concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/test-tools/kubelet-v1.37.2/kubelet"
            ),
            Version::V1_30 => concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/test-tools/kubelet-v1.30.14/kubelet"
            ),
        }
    }

    /// The `:authority` form its connection uses, as the daemon logs it.
    fn authority_form(self) -> &'static str {
        match self {
            Version::V1_37 => "localhost",
            Version::V1_30 => "percent-encoded-path",
        }
    }
}

/// A standalone kubelet (no API server): static pods from a directory,
/// cgroupfs (this VM has cgroup v1), host-network pods (no CNI), loopback
/// only.
struct Kubelet {
    child: Option<Child>,
    log: PathBuf,
}

impl Kubelet {
    fn start(
        version: Version,
        dir: &Path,
        runtime: &Path,
        image_service: &Path,
        manifests: &Path,
    ) -> Self {
        let bin = version.binary();
        assert!(
            Path::new(bin).is_file(),
            "kubelet not found at {bin}: run .ci/install (it builds kubelet from the Go module proxy)"
        );
        // kubelet 1.31 and later refuse cgroup v1 (this VM's) unless told.
        let cgroup_v1 = match version {
            Version::V1_37 => "failCgroupV1: false\n",
            Version::V1_30 => "",
        };
        let root = dir.join("kubelet");
        std::fs::create_dir_all(&root).unwrap();
        let port = support::real::free_port();
        let healthz = support::real::free_port();
        let config = root.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {manifests}
fileCheckFrequency: 1s
syncFrequency: 5s
containerRuntimeEndpoint: unix://{runtime}
imageServiceEndpoint: unix://{image_service}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
{cgroup_v1}address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
resolvConf: \"\"
",
                manifests = manifests.display(),
                runtime = runtime.display(),
                image_service = image_service.display(),
            ),
        )
        .unwrap();
        let log = root.join("kubelet.log");
        let child = Command::new(bin)
            .arg(format!("--config={}", config.display()))
            .arg(format!("--root-dir={}", root.join("root").display()))
            .arg(format!("--cert-dir={}", root.join("pki").display()))
            .arg("--hostname-override=ecr-pull-proxy-test")
            .arg("--v=2")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Kubelet {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The names of the containers containerd runs now.
fn running_containers(containerd: &Path) -> Vec<String> {
    let out = Command::new(support::crictl())
        .arg(format!(
            "--runtime-endpoint=unix://{}",
            containerd.display()
        ))
        .args(["ps", "--state", "running", "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A static pod running `image`'s `/pause` on the host network.
fn static_pod(manifests: &Path, name: &str, image: &str) {
    std::fs::write(
        manifests.join(format!("{name}.yaml")),
        format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
spec:
  hostNetwork: true
  containers:
  - name: {name}
    image: {image}
    imagePullPolicy: IfNotPresent
    command: [\"/pause\"]
"
        ),
    )
    .unwrap();
}

fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "{what}: not within {timeout:?}; kubelet's log ends:\n{}",
        tail(&log())
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The five checks, for one kubelet on one containerd:
/// 1. kubelet pointed at containerd cannot start the pod: containerd's
///    refusal is in kubelet's log (the registry really wants the token);
/// 2. pointed at the daemon, the pod runs (its image and its pause image
///    from private ECR); the daemon's pull line shows the token injected;
///    moto saw the token call;
/// 3. kubelet's own calls (ImageFsInfo, ListImages, ImageStatus,
///    PullImage) go through the daemon with status OK, on a connection
///    whose `:authority` is the version's, and kubelet logs no transport
///    error;
/// 5. the pod deleted, its image removed at containerd and a pod
///    re-created: the pull goes through again with the cached token (no
///    new token call);
/// 4. containerd restarted, then the daemon restarted, under the running
///    kubelet: the pod keeps running, and a pod added after each restart
///    starts, without a kubelet restart.
fn kubelet_runs_pods_from_private_ecr(version: Version, containerd: ContainerdVersion) {
    let pause = std::fs::read(support::go::build("pause", "pause")).unwrap();
    let mut s = Stack::with_sandbox_image_on(
        containerd,
        &[ECR_HOST],
        &format!("{ECR_HOST}/eks/pause:3.10"),
    );
    // Two images with different contents (one image ID each: removing the
    // app's must leave the pause image alone).
    s.registry.push_files_image(
        "eks/pause",
        &["3.10"],
        &[("pause", &pause, 0o755)],
        &["/pause"],
    );
    s.registry.push_files_image(
        "app",
        &["v1"],
        &[("pause", &pause, 0o755), ("app", b"app", 0o644)],
        &["/pause"],
    );
    let image = format!("{ECR_HOST}/app:v1");
    let ctd = s.containerd.socket.clone();
    let manifests = s.dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    static_pod(&manifests, "app", &image);

    // 1. kubelet straight to containerd: the pull is refused.
    {
        let dir = s.dir.path().join("direct");
        std::fs::create_dir_all(&dir).unwrap();
        let k = Kubelet::start(version, &dir, &ctd, &ctd, &manifests);
        // containerd's refusal, in kubelet's log: of the pause image (the
        // sandbox) or of the app's.
        wait_for(
            Duration::from_secs(120),
            "kubelet reports the registry's refusal",
            || {
                let log = k.log().to_ascii_lowercase();
                ecr_pull_proxy::pull::REFUSAL_PHRASES
                    .iter()
                    .any(|p| log.contains(p))
            },
            || k.log(),
        );
        assert!(running_containers(&ctd).is_empty());
    }

    // 2. Through the daemon: the pod runs.
    let config = format!(
        "sandbox_image = \"auto\"\ncontainerd_config = {:?}",
        s.containerd.config.display().to_string()
    );
    let env = s.moto.env();
    let mut proxy = s.proxy_with_env_args("p", &config, env.clone(), vec!["--log-level", "debug"]);
    let dir = s.dir.path().join("through");
    std::fs::create_dir_all(&dir).unwrap();
    let k = Kubelet::start(version, &dir, &ctd, &proxy.socket, &manifests);
    let runs = |name: &str, k: &Kubelet, proxy: &support::ProxyProcess| {
        wait_for(
            Duration::from_secs(180),
            &format!("pod {name}'s container runs"),
            || running_containers(&ctd).contains(&name.to_owned()),
            || format!("{}\n--- daemon:\n{}", tail(&k.log()), tail(&proxy.logs())),
        )
    };
    runs("app", &k, &proxy);
    let logs = proxy.logs();
    assert!(
        logs.contains(&format!(
            "image={image} registry={ECR_HOST} credentials=\"injected\""
        )) && logs.contains("result=\"ok\""),
        "{logs}"
    );
    let token_calls = s.moto.calls("GetAuthorizationToken", "us-east-1");
    assert!(token_calls >= 1);

    // 3. kubelet's own calls went through the daemon without an error.
    for method in ["ImageFsInfo", "ListImages", "ImageStatus", "PullImage"] {
        assert!(
            logs.contains(&format!(
                "method=/runtime.v1.ImageService/{method} grpc_status=\"0\""
            )),
            "kubelet's {method} did not go through the daemon: {logs}"
        );
    }
    assert!(
        logs.contains(&format!("authority_form=\"{}\"", version.authority_form())),
        "{logs}"
    );
    let klog = k.log();
    assert!(
        !klog.contains("PROTOCOL_ERROR") && !klog.contains("desc = ecr-pull-proxy"),
        "{}",
        tail(&klog)
    );

    // 5. Pod deleted, image removed, pod re-created: pulled again, with
    //    the cached token.
    std::fs::remove_file(manifests.join("app.yaml")).unwrap();
    wait_for(
        Duration::from_secs(120),
        "the deleted pod's container stops",
        || !running_containers(&ctd).contains(&"app".to_owned()),
        || k.log(),
    );
    let rmi = Command::new(support::crictl())
        .arg(format!("--image-endpoint=unix://{}", ctd.display()))
        .args(["rmi", &image])
        .output()
        .unwrap();
    assert!(
        rmi.status.success(),
        "{}",
        String::from_utf8_lossy(&rmi.stderr)
    );
    static_pod(&manifests, "again", &image);
    runs("again", &k, &proxy);
    let logs = proxy.logs();
    assert_eq!(
        logs.matches(&format!(
            "image={image} registry={ECR_HOST} credentials=\"injected\""
        ))
        .count(),
        2,
        "{logs}"
    );
    assert_eq!(
        s.moto.calls("GetAuthorizationToken", "us-east-1"),
        token_calls,
        "the second pull used the cached token"
    );

    // 4. containerd restarted under kubelet: the pod keeps running; a pod
    //    added afterwards starts.
    s.containerd.restart();
    static_pod(&manifests, "after-containerd", &image);
    runs("after-containerd", &k, &proxy);
    assert!(running_containers(&ctd).contains(&"again".to_owned()));
    //    The daemon restarted under kubelet (a package upgrade): the same.
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    proxy.wait(Duration::from_secs(40));
    drop(proxy);
    let proxy = s.proxy_with_env_args("p", &config, env, vec!["--log-level", "debug"]);
    static_pod(&manifests, "after-daemon", &image);
    runs("after-daemon", &k, &proxy);
    let running = running_containers(&ctd);
    assert!(
        running.contains(&"again".to_owned()) && running.contains(&"after-containerd".to_owned()),
        "{running:?}"
    );
    assert!(proxy
        .logs()
        .contains("/runtime.v1.ImageService/ImageStatus grpc_status=\"0\""));

    assert_no_secrets(&logs);
    assert_no_secrets(&proxy.logs());
    assert!(!k.log().contains(MOTO_PASSWORD));
    drop(k);
    // The pods' containers outlive containerd (their shims do): remove
    // every pod while containerd still runs, and check that none is left.
    let rmp = Command::new(support::crictl())
        .arg(format!("--runtime-endpoint=unix://{}", ctd.display()))
        .args(["rmp", "--force", "--all"])
        .output()
        .unwrap();
    assert!(
        rmp.status.success(),
        "{}",
        String::from_utf8_lossy(&rmp.stderr)
    );
    assert!(running_containers(&ctd).is_empty());
}

#[test]
fn kubelet_1_37_runs_pods_from_private_ecr_through_the_daemon_on_containerd_1_6() {
    kubelet_runs_pods_from_private_ecr(Version::V1_37, ContainerdVersion::One);
}

#[test]
fn kubelet_1_37_runs_pods_from_private_ecr_through_the_daemon_on_containerd_2() {
    kubelet_runs_pods_from_private_ecr(Version::V1_37, ContainerdVersion::Two);
}

#[test]
fn kubelet_1_30_runs_pods_from_private_ecr_through_the_daemon_on_containerd_1_6() {
    kubelet_runs_pods_from_private_ecr(Version::V1_30, ContainerdVersion::One);
}

#[test]
fn kubelet_1_30_runs_pods_from_private_ecr_through_the_daemon_on_containerd_2() {
    kubelet_runs_pods_from_private_ecr(Version::V1_30, ContainerdVersion::Two);
}
