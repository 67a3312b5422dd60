//! The real parts, each started by the test with its own temporary state:
//! containerd (Debian `containerd`), a registry with htpasswd auth (Debian
//! `docker-registry`), the ECR API emulator (`moto_server`, PyPI
//! `moto[server]`), and a tiny test image pushed over the registry API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::Digest;

use super::{require, wait_until};

/// The account moto answers for.
pub const MOTO_ACCOUNT: &str = "123456789012";
/// The registry password inside moto's tokens (`AWS:<this>`).
pub const MOTO_PASSWORD: &str = "123456789012-auth-token";
/// moto's token as it travels: base64 of `AWS:<password>`.
pub const MOTO_TOKEN_B64: &str = "QVdTOjEyMzQ1Njc4OTAxMi1hdXRoLXRva2Vu";
/// The node's AWS secret access key (moto accepts any).
pub const NODE_SECRET_KEY: &str = "node-secret-key-9c41e0";

/// A loopback TCP port nothing listens on (as of now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a server with `start(port)` on a free loopback port and waits
/// until *that process* listens there. A port picked free can be taken by
/// another process before the server binds it (seen under load: moto
/// "listening", then `Connection refused`); then the server exits, or
/// someone else answers, and it is started again on another port.
pub fn start_on_free_port(what: &str, mut start: impl FnMut(u16) -> Child) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = start(port);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                break; // it exited: the port was taken; try another
            }
            if listens_on(child.id(), port) {
                return (child, port);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not listen on port {port} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.wait();
    }
    panic!("{what} could not bind a loopback port in five tries");
}

/// Whether process `pid` holds a socket listening on TCP `port` of a
/// loopback IPv4 address (the kernel's socket table, then the process's
/// descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // 127.x.y.z, in the table's little-endian hex: ends in "7F".
    let suffix = format!("7F:{port:04X}");
    let targets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1].len() == 13 && f[1].ends_with(&suffix) && f[3] == "0A")
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if targets.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .map(|l| targets.iter().any(|t| l.to_string_lossy() == *t))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A minimal HTTP/1.0 exchange (no chunking, connection closes). Retried a
/// few times when the server resets the connection while it starts.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    for _ in 0..20 {
        match try_http(addr, method, path, headers, body) {
            Ok(r) => return r,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                std::thread::sleep(Duration::from_millis(250))
            }
            Err(e) => panic!("{method} http://{addr}{path}: {e}"),
        }
    }
    panic!("{method} http://{addr}{path}: connection reset every time");
}

/// `GET path` once: the body if the answer is 200, else `None` (the
/// server may be gone).
pub fn try_http_get(addr: &str, path: &str) -> Option<Vec<u8>> {
    match try_http(addr, "GET", path, &[], b"") {
        Ok((200, _, body)) => Some(body),
        _ => None,
    }
}

fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    // No head: the server closed without answering (it is stopping).
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no HTTP response head in {} bytes", raw.len()),
            )
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Ok((status, head, raw[split + 4..].to_vec()))
}

// === registry ===

/// A docker-registry with htpasswd auth on a loopback port.
pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    user: String,
    password: String,
    /// Its access log (one line per request, Apache combined format).
    access_log: std::path::PathBuf,
}

impl Registry {
    /// Starts a registry in `dir` whose only user is `user`/`password`.
    pub fn start(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_named(dir, "registry", Some((user, password)))
    }

    /// Starts a registry in `dir/name`: with htpasswd auth for
    /// `user`/`password`, or open to anyone with `None`.
    pub fn start_named(dir: &Path, name: &str, auth: Option<(&str, &str)>) -> Self {
        let bin = require("docker-registry", "the Debian package docker-registry");
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let htpasswd_section = match auth {
            Some((user, password)) => {
                super::secrets::issued(password);
                let htpasswd = require("htpasswd", "the Debian package apache2-utils");
                let out = Command::new(htpasswd)
                    .args(["-Bbn", user, password])
                    .output()
                    .unwrap();
                assert!(out.status.success());
                std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    dir.join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        let access_log = dir.join("access.log");
        let (child, port) = start_on_free_port("docker-registry", |port| {
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{htpasswd_section}",
                data = dir.join("data").display(),
            );
            std::fs::write(dir.join("config.yml"), config).unwrap();
            let log = std::fs::File::create(dir.join("log")).unwrap();
            let access = std::fs::File::create(&access_log).unwrap();
            Command::new(&bin)
                .arg("serve")
                .arg(dir.join("config.yml"))
                .stdout(access)
                .stderr(log)
                .spawn()
                .unwrap()
        });
        let addr = format!("127.0.0.1:{port}");
        let (user, password) = auth.unwrap_or(("", ""));
        Registry {
            child: Some(child),
            addr,
            user: user.into(),
            password: password.into(),
            access_log,
        }
    }

    /// The status of every manifest request for `repo` so far, in order
    /// (containerd resolves an image by its manifest: one attempt to pull
    /// is a run of these). Waits until the log has been quiet for 300 ms,
    /// so requests of a pull that just ended are counted.
    pub fn manifest_requests(&self, repo: &str) -> Vec<u16> {
        let needle = format!("/v2/{repo}/manifests/");
        self.read_quiet_log(|log| {
            log.lines()
                .filter(|l| l.contains(&needle))
                .filter_map(|l| {
                    // `... "HEAD /v2/app/manifests/v1 HTTP/1.1" 401 146 ...`
                    let after = l.split("\" ").nth(1)?;
                    after.split(' ').next()?.parse().ok()
                })
                .collect::<Vec<u16>>()
        })
    }

    /// `read` of the access log once it has been quiet for 300 ms (what
    /// `read` makes of it twice in a row), so that the requests of a pull
    /// that just ended are in it.
    fn read_quiet_log<T: PartialEq>(&self, read: impl Fn(&str) -> T) -> T {
        let read = || read(&std::fs::read_to_string(&self.access_log).unwrap_or_default());
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = read();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// How many blobs (layers and configs) the registry has served whole
    /// (`GET …/blobs/sha256:…` answered 200) so far: what containerd
    /// really downloaded, once the log has been quiet for 300 ms.
    pub fn blob_downloads(&self) -> usize {
        self.read_quiet_log(|log| {
            log.lines()
                .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
                .filter(|l| l.split("\" ").nth(1).is_some_and(|a| a.starts_with("200 ")))
                .count()
        })
    }

    fn auth(&self) -> (&'static str, String) {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        ("Authorization", format!("Basic {b}"))
    }

    fn put_blob(&self, repo: &str, blob: &[u8]) -> String {
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(blob));
        let (status, head, _) = http(
            &self.addr,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[self.auth()],
            b"",
        );
        assert_eq!(status, 202, "blob upload start: {head}");
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .expect("upload location")
            .trim()
            .trim_start_matches(&format!("http://{}", self.addr))
            .to_owned();
        let (status, head, _) = http(
            &self.addr,
            "PUT",
            &format!("{location}&digest={digest}"),
            &[
                self.auth(),
                ("Content-Type", "application/octet-stream".into()),
            ],
            blob,
        );
        assert_eq!(status, 201, "blob upload: {head}");
        digest
    }

    /// Pushes a one-layer image as `repo:tag` for each tag; returns the
    /// manifest digest.
    pub fn push_image(&self, repo: &str, tags: &[&str]) -> String {
        self.push_image_sized(repo, tags, 0)
    }

    /// As [`Registry::push_image`], with `extra` more bytes in the layer.
    pub fn push_image_sized(&self, repo: &str, tags: &[&str], extra: usize) -> String {
        let mut content = format!("hello from {repo}\n").into_bytes();
        // Pseudo-random, so that nothing along the way can compress it away.
        let mut x: u32 = 2_463_534_242;
        content.extend((0..extra).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        self.push_files_image(repo, tags, &[("hello.txt", &content, 0o644)], &[])
    }

    /// Pushes a one-layer image of `files` (path, content, mode) with
    /// `entrypoint`; returns the manifest digest.
    pub fn push_files_image(
        &self,
        repo: &str,
        tags: &[&str],
        files: &[(&str, &[u8], u32)],
        entrypoint: &[&str],
    ) -> String {
        let mut tarball = tar::Builder::new(Vec::new());
        for (path, content, mode) in files {
            let mut header = tar::Header::new_ustar();
            header.set_size(content.len() as u64);
            header.set_mode(*mode);
            header.set_mtime(0);
            header.set_cksum();
            tarball.append_data(&mut header, path, *content).unwrap();
        }
        let layer = tarball.into_inner().unwrap();
        let layer_digest = self.put_blob(repo, &layer);
        let arch = go_arch();
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}},"config":{{"Entrypoint":{}}}}}"#,
            serde_json::to_string(entrypoint).unwrap()
        );
        let config_digest = self.put_blob(repo, config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        for tag in tags {
            let (status, head, _) = http(
                &self.addr,
                "PUT",
                &format!("/v2/{repo}/manifests/{tag}"),
                &[
                    self.auth(),
                    (
                        "Content-Type",
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    ),
                ],
                manifest.as_bytes(),
            );
            assert_eq!(status, 201, "manifest upload: {head}");
        }
        format!("sha256:{:x}", sha2::Sha256::digest(manifest.as_bytes()))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// This machine's architecture as Go and OCI name it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// === containerd ===

/// Which containerd a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerdVersion {
    /// Debian 12's containerd 1.6 (config schema 2).
    One,
    /// containerd 2.x from Debian unstable, unpacked by `.ci/install` under
    /// `target/test-tools/containerd-2` (config schema 3).
    Two,
}

/// Where `.ci/install` unpacks containerd 2.x.
pub const CONTAINERD_2_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/test-tools/containerd-2/usr/bin"
);

/// A containerd with its own root, state, socket and `certs.d`.
pub struct Containerd {
    child: Option<Child>,
    /// Its CRI socket.
    pub socket: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    dir: PathBuf,
    version: ContainerdVersion,
}

impl Containerd {
    /// Gives `names` images in the CRI namespace, `per_image` names to an
    /// image (one shared layer, a config of each image's own), with one
    /// `ctr images import` of an OCI layout: a node with that many image
    /// names (a multi-MiB `ListImages`) with no registry and no pull.
    /// containerd 1.6 only (Debian's `ctr`). Each blob costs containerd a
    /// synced write, and CRI learns of imported images from events, tens a
    /// second: restart containerd to have it load them all at once.
    pub fn import_names(&self, names: &[String], per_image: usize) {
        assert_eq!(
            self.version,
            ContainerdVersion::One,
            "Debian's ctr is 1.6's"
        );
        let ctr = require("ctr", "the Debian package containerd");
        let digest = |b: &[u8]| format!("{:x}", sha2::Sha256::digest(b));
        let mut archive = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            archive.append_data(&mut header, path, data).unwrap();
        };
        let mut layer = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(6);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        layer
            .append_data(&mut header, "names", &b"names\n"[..])
            .unwrap();
        let layer = layer.into_inner().unwrap();
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add(&format!("blobs/sha256/{}", digest(&layer)), &layer);
        let mut entries = Vec::new();
        for (image, names) in names.chunks(per_image).enumerate() {
            let config = serde_json::to_vec(&serde_json::json!({
                "architecture": go_arch(),
                "os": "linux",
                "config": { "Labels": { "image": image.to_string() } },
                "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", digest(&layer))] },
            }))
            .unwrap();
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{}", digest(&config)),
                    "size": config.len(),
                },
                "layers": [{
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", digest(&layer)),
                    "size": layer.len(),
                }],
            }))
            .unwrap();
            add(&format!("blobs/sha256/{}", digest(&config)), &config);
            add(&format!("blobs/sha256/{}", digest(&manifest)), &manifest);
            for name in names {
                entries.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", digest(&manifest)),
                    "size": manifest.len(),
                    "annotations": { "io.containerd.image.name": name },
                }));
            }
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": entries,
        }))
        .unwrap();
        add("index.json", &index);
        let path = self.dir.join("names.tar");
        std::fs::write(&path, archive.into_inner().unwrap()).unwrap();
        let out = Command::new(ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io", "images", "import", "--no-unpack"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts containerd in `dir`; each `(host, registry_addr)` gets a
    /// `hosts.toml` sending pulls for `host` to the registry over plain HTTP.
    pub fn start(dir: &Path, mirrors: &[(&str, &str)]) -> Self {
        Self::start_with_sandbox_image(dir, mirrors, None)
    }

    /// As [`Containerd::start`], with `sandbox_image` set in its CRI config
    /// (the pause image it pulls itself for every pod).
    pub fn start_with_sandbox_image(
        dir: &Path,
        mirrors: &[(&str, &str)],
        sandbox_image: Option<&str>,
    ) -> Self {
        Self::start_version(dir, mirrors, sandbox_image, ContainerdVersion::One)
    }

    /// As [`Containerd::start_with_sandbox_image`], for `version`.
    pub fn start_version(
        dir: &Path,
        mirrors: &[(&str, &str)],
        sandbox_image: Option<&str>,
        version: ContainerdVersion,
    ) -> Self {
        require("runc", "the Debian package runc");
        let dir = dir.join("ctd");
        std::fs::create_dir_all(&dir).unwrap();
        for (host, addr) in mirrors {
            let d = dir.join("certs.d").join(host);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("hosts.toml"),
                format!("server = \"http://{addr}\"\n\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
            )
            .unwrap();
        }
        let socket = dir.join("c.sock");
        let common = format!(
            r#"root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        let certs = dir.join("certs.d");
        let config = match version {
            ContainerdVersion::One => format!(
                r#"version = 2
{common}[plugins."io.containerd.grpc.v1.cri"]
  {sandbox}
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # This VM does not let even root lower a process's oom_score_adj below
  # its parent's, which containerd does for pause processes (-998).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
                certs = certs.display(),
                sandbox = sandbox_image
                    .map(|i| format!("sandbox_image = \"{i}\""))
                    .unwrap_or_default(),
            ),
            ContainerdVersion::Two => format!(
                r#"version = 3
{common}[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime"]
  # As for containerd 1.6: this VM refuses a lower oom_score_adj.
  restrict_oom_score_adj = true
# containerd 2.x's CRI pulls through the transfer service, which unpacks
# only for the platforms and snapshotters it is told of.
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/{arch}"
    snapshotter = "native"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    {sandbox}
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{certs}"
"#,
                certs = certs.display(),
                arch = go_arch(),
                sandbox = sandbox_image
                    .map(|i| format!("sandbox = \"{i}\""))
                    .unwrap_or_default(),
            ),
        };
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut c = Containerd {
            child: None,
            socket,
            config: config_path,
            dir,
            version,
        };
        c.assert_version();
        c.spawn();
        c
    }

    /// The binary for this version.
    fn binary(&self) -> PathBuf {
        match self.version {
            ContainerdVersion::One => require("containerd", "the Debian package containerd"),
            ContainerdVersion::Two => Path::new(CONTAINERD_2_DIR).join("containerd"),
        }
    }

    /// The test runs on the containerd it says, not on whatever is found.
    fn assert_version(&self) {
        let bin = self.binary();
        let out = Command::new(&bin).arg("--version").output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let want = match self.version {
            ContainerdVersion::One => " 1.6.",
            ContainerdVersion::Two => "/v2 2.",
        };
        assert!(
            text.contains(want),
            "{} is not the containerd {:?} this test runs on: {text:?}",
            bin.display(),
            self.version
        );
    }

    fn spawn(&mut self) {
        let mut command = match self.version {
            ContainerdVersion::One => {
                Command::new(require("containerd", "the Debian package containerd"))
            }
            ContainerdVersion::Two => {
                let bin = Path::new(CONTAINERD_2_DIR).join("containerd");
                assert!(
                    bin.is_file(),
                    "containerd 2.x not found at {}: run .ci/install (it unpacks Debian unstable's package there)",
                    bin.display()
                );
                // Its own shim first.
                let path = std::env::var_os("PATH").unwrap_or_default();
                let path = std::env::join_paths(
                    std::iter::once(PathBuf::from(CONTAINERD_2_DIR))
                        .chain(std::env::split_paths(&path)),
                )
                .unwrap();
                let mut c = Command::new(bin);
                c.env("PATH", path);
                c
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = command
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.socket.clone();
        wait_until(Duration::from_secs(30), "containerd to listen", || {
            sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        wait_cri_ready(&sock);
    }

    /// Replaces `from` with `to` in its config file (takes effect at the
    /// next restart).
    pub fn replace_in_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(
            text.contains(from),
            "{from} is not in {}",
            self.config.display()
        );
        std::fs::write(&self.config, text.replace(from, to)).unwrap();
    }

    /// Replaces the `hosts.toml` containerd reads for `host` (read at every
    /// pull, by containerd and the daemon alike: no restart).
    pub fn write_hosts(&self, host: &str, text: &str) {
        let d = self.dir.join("certs.d").join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), text).unwrap();
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Kills containerd (SIGKILL, like a crash).
    pub fn kill(&mut self) {
        kill(&mut self.child);
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts it again with the same state.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// containerd accepts on its socket a moment before its CRI service answers:
/// wait until `ImageFsInfo` succeeds. Runs its own runtime on a thread, so
/// it works from sync and async tests alike.
fn wait_cri_ready(sock: &Path) {
    let sock = sock.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let mut c = ecr_pull_proxy::cri::image_service_client::ImageServiceClient::new(
                    super::channel(&sock),
                );
                if c.image_fs_info(ecr_pull_proxy::cri::ImageFsInfoRequest {})
                    .await
                    .is_ok()
                {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "containerd's CRI service never answered"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    })
    .join()
    .unwrap();
}

impl Drop for Containerd {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

// === moto ===

/// The ECR API emulator, recording every request it gets.
pub struct Moto {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Moto {
    /// Starts `moto_server` on a free loopback port.
    pub fn start(dir: &Path) -> Self {
        let bin = require(
            "moto_server",
            "moto[server] from PyPI (`pip install 'moto[server]'`)",
        );
        let (child, port) = start_on_free_port("moto_server", |port| {
            let log = std::fs::File::create(dir.join("moto.log")).unwrap();
            Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_ENABLE_RECORDING", "True")
                // The recording is a file in the working directory: one per moto.
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        });
        let addr = format!("127.0.0.1:{port}");
        let m = Moto {
            child: Some(child),
            addr,
        };
        let (status, head, _) = http(
            &m.addr,
            "POST",
            "/moto-api/recorder/start-recording",
            &[],
            b"",
        );
        assert_eq!(status, 200, "{head}");
        // One request that no test counts, so that the recording exists.
        let (status, head, _) = http(
            &m.addr,
            "GET",
            "/?Action=GetCallerIdentity&Version=2011-06-15",
            &[],
            b"",
        );
        assert_eq!(status, 200, "{head}");
        super::secrets::moto_started(&m.addr);
        m
    }

    /// The AWS environment that points the proxy at this emulator.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://{}", self.addr)),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", NODE_SECRET_KEY.into()),
        ]
    }

    /// Every request moto has recorded, as (action, region, decoded body):
    /// the action from `X-Amz-Target` (JSON APIs such as ECR) or from
    /// `Action=` in the body (query APIs such as STS), the region from the
    /// signature's credential scope.
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.recorded()
            .into_iter()
            .map(|r| (r.action, r.region, r.body))
            .collect()
    }

    /// Who signed each `action` request moto has recorded: the access key
    /// of the signature's credential scope and the session token sent with
    /// it (`X-Amz-Security-Token`), if any.
    pub fn signers(&self, action: &str) -> Vec<(String, Option<String>)> {
        self.recorded()
            .into_iter()
            .filter(|r| r.action == action)
            .map(|r| (r.access_key, r.session_token))
            .collect()
    }

    fn recorded(&self) -> Vec<Recorded> {
        use base64::Engine;
        let (status, _, body) = http(
            &self.addr,
            "GET",
            "/moto-api/recorder/download-recording",
            &[],
            b"",
        );
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let headers = &v["headers"];
                let mut body = v["body"].as_str().unwrap_or("").to_owned();
                if v["body_encoded"].as_bool() == Some(true) {
                    body = String::from_utf8_lossy(
                        &base64::engine::general_purpose::STANDARD
                            .decode(&body)
                            .unwrap(),
                    )
                    .into_owned();
                }
                let action = match headers["X-Amz-Target"].as_str() {
                    Some(t) => t.rsplit('.').next().unwrap().to_owned(),
                    None => body
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("Action="))
                        .or_else(|| {
                            v["url"].as_str().and_then(|u| {
                                u.split(['?', '&'])
                                    .find_map(|kv| kv.strip_prefix("Action="))
                            })
                        })
                        .unwrap_or("")
                        .to_owned(),
                };
                // Credential=KEY/DATE/REGION/SERVICE/aws4_request
                let scope: Vec<&str> = headers["Authorization"]
                    .as_str()
                    .and_then(|a| a.split("Credential=").nth(1))
                    .and_then(|c| c.split([',', ' ']).next())
                    .map(|c| c.split('/').collect())
                    .unwrap_or_default();
                let part = |i: usize| scope.get(i).copied().unwrap_or("").to_owned();
                Recorded {
                    action,
                    region: part(2),
                    access_key: part(0),
                    session_token: headers["X-Amz-Security-Token"].as_str().map(str::to_owned),
                    via: headers["Via"].as_str().map(str::to_owned),
                    body,
                }
            })
            .collect()
    }

    /// The `Via` header of each `action` request moto has recorded: the
    /// HTTP proxies it passed through (`None`: it came direct).
    pub fn vias(&self, action: &str) -> Vec<Option<String>> {
        self.recorded()
            .into_iter()
            .filter(|r| r.action == action)
            .map(|r| r.via)
            .collect()
    }

    /// How many `action` requests were signed for `region`.
    pub fn calls(&self, action: &str, region: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(a, r, _)| a == action && r == region)
            .count()
    }
}

/// One request from moto's recording.
struct Recorded {
    action: String,
    region: String,
    access_key: String,
    session_token: Option<String>,
    via: Option<String>,
    body: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        super::secrets::moto_stopped(&self.addr);
        kill(&mut self.child);
    }
}

// === instance metadata ===

/// AWS's own IMDS emulator, amazon-ec2-metadata-mock, as `.ci/install`
/// builds it from the Go module proxy.
pub const IMDS_MOCK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/test-tools/ec2-metadata-mock-v1.13.0/ec2-metadata-mock"
);

/// The instance role's credentials as instance metadata hands them out.
#[derive(Clone)]
pub struct RoleKeys {
    pub access_key: String,
    pub secret: String,
    pub session_token: String,
}

impl RoleKeys {
    /// Keys whose every part carries `tag`, so that a test can tell them
    /// apart from the stack's other secrets and from each other.
    pub fn tagged(tag: &str) -> Self {
        let keys = RoleKeys {
            access_key: format!("ASIAROLE{}", tag.to_ascii_uppercase()),
            secret: format!("role-secret-{tag}-5be1"),
            session_token: format!("role-session-{tag}-a93c"),
        };
        super::secrets::issued(&keys.secret);
        super::secrets::issued(&keys.session_token);
        keys
    }
}

/// amazon-ec2-metadata-mock on a loopback port, IMDSv2 only (a request
/// without a session token gets 401), serving `RoleKeys` as the instance
/// role's credentials and `region` as the instance's. It watches its
/// config file, so [`Imds::rotate`] changes the keys it serves, as EC2
/// does when it rotates the role's credentials.
pub struct Imds {
    child: Option<Child>,
    /// The loopback address it listens on.
    pub host: String,
    pub port: u16,
    dir: PathBuf,
    region: String,
}

impl Imds {
    /// On 127.0.0.1.
    pub fn start(
        dir: &Path,
        keys: &RoleKeys,
        expires: std::time::SystemTime,
        region: &str,
    ) -> Self {
        Self::start_on("127.0.0.1", dir, keys, expires, region)
    }

    /// On loopback address `host` (127.0.0.2 keeps it apart from moto, for
    /// `NO_PROXY`).
    pub fn start_on(
        host: &str,
        dir: &Path,
        keys: &RoleKeys,
        expires: std::time::SystemTime,
        region: &str,
    ) -> Self {
        assert!(
            Path::new(IMDS_MOCK).is_file(),
            "amazon-ec2-metadata-mock not found at {IMDS_MOCK}: run .ci/install (it builds v1.13.0 from the Go module proxy)"
        );
        let dir = dir.join("imds");
        std::fs::create_dir_all(&dir).unwrap();
        let mut imds = Imds {
            child: None,
            host: host.to_owned(),
            port: 0,
            dir,
            region: region.to_owned(),
        };
        imds.write_config(keys, expires);
        let (child, port) = start_on_free_port("amazon-ec2-metadata-mock", |port| imds.spawn(port));
        imds.child = Some(child);
        imds.port = port;
        imds
    }

    fn spawn(&self, port: u16) -> Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("imds.log"))
            .unwrap();
        Command::new(IMDS_MOCK)
            .arg("--config-file")
            .arg(self.dir.join("config.json"))
            .args(["--watch-config-file", "--imdsv2", "--hostname", &self.host])
            .args(["--port", &port.to_string()])
            // It looks for (and may save) its config under $HOME.
            .env("HOME", &self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn write_config(&self, keys: &RoleKeys, expires: std::time::SystemTime) {
        let config = serde_json::json!({
            "metadata": {
                "values": {
                    "placement-region": self.region,
                    "iam-security-credentials": {
                        "Code": "Success",
                        "LastUpdated": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                        "Type": "AWS-HMAC",
                        "AccessKeyId": keys.access_key,
                        "SecretAccessKey": keys.secret,
                        "Token": keys.session_token,
                        "Expiration": humantime::format_rfc3339_seconds(expires).to_string(),
                    }
                }
            }
        });
        // Renamed into place: the watcher never reads a half-written file.
        let tmp = self.dir.join("config.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        std::fs::rename(&tmp, self.dir.join("config.json")).unwrap();
    }

    /// `http://HOST:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The paths of the metadata requests it has answered, from its log.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("imds.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split("Received request to mock static metadata: ").nth(1))
            .map(str::to_owned)
            .collect()
    }

    /// The environment that points the AWS SDK's instance-metadata
    /// provider at this emulator (the SDK's own knob for a non-default
    /// endpoint); nothing else about the identity is set.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_EC2_METADATA_DISABLED", "false".into()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.endpoint()),
        ]
    }

    /// The access key the emulator serves now, asked as the SDK asks
    /// (IMDSv2: a session token first); `None` while it does not answer.
    pub fn served_key(&self) -> Option<String> {
        let addr = format!("{}:{}", self.host, self.port);
        let token = try_http(
            &addr,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60".into())],
            b"",
        )
        .ok()
        .filter(|(status, _, _)| *status == 200)?
        .2;
        let token = String::from_utf8(token).unwrap();
        let headers = [("X-aws-ec2-metadata-token", token)];
        let (_, _, role) = try_http(
            &addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &headers,
            b"",
        )
        .ok()?;
        let role = String::from_utf8(role).unwrap();
        let path = format!("/latest/meta-data/iam/security-credentials/{}", role.trim());
        let (status, _, creds) = try_http(&addr, "GET", &path, &headers, b"").ok()?;
        (status == 200).then_some(())?;
        let creds: serde_json::Value = serde_json::from_slice(&creds).ok()?;
        creds["AccessKeyId"].as_str().map(str::to_owned)
    }

    /// Whether a request without an IMDSv2 session token is refused.
    pub fn refuses_v1(&self) -> bool {
        let addr = format!("{}:{}", self.host, self.port);
        let (status, _, _) = http(&addr, "GET", "/latest/meta-data/placement/region", &[], b"");
        status == 401
    }

    /// Serves `keys` from now on, expiring at `expires`, and waits until the
    /// emulator hands them out.
    pub fn rotate(&self, keys: &RoleKeys, expires: std::time::SystemTime) {
        self.write_config(keys, expires);
        wait_until(
            Duration::from_secs(10),
            "the emulator to serve the rotated keys",
            || self.served_key().as_deref() == Some(keys.access_key.as_str()),
        );
    }

    /// Stops the emulator: instance metadata refuses connections.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the emulator again on the same port, and waits until that
    /// process listens there.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the emulator still runs");
        let mut child = self.spawn(self.port);
        wait_until(
            Duration::from_secs(30),
            "the emulator to listen again",
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the emulator exited with {status} (port {} taken?)",
                        self.port
                    );
                }
                listens_on(child.id(), self.port)
            },
        );
        self.child = Some(child);
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

// === HTTP proxy ===

/// tinyproxy (Debian's), an HTTP proxy on a loopback port that logs every
/// request it forwards.
pub struct Tinyproxy {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: PathBuf,
}

impl Tinyproxy {
    pub fn start(dir: &Path) -> Self {
        let bin = require("tinyproxy", "tinyproxy (Debian's `tinyproxy` package)");
        let dir = dir.join("tinyproxy");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("tinyproxy.log");
        let (child, port) = start_on_free_port("tinyproxy", |port| {
            let conf = dir.join("tinyproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\nMaxClients 100\nAllow 127.0.0.1\n",
                    log.display()
                ),
            )
            .unwrap();
            Command::new(&bin)
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        });
        Tinyproxy {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            log,
        }
    }

    /// `http://127.0.0.1:PORT`, as `HTTPS_PROXY` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request lines it has forwarded (`POST http://HOST:PORT/ HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split("]: Request (file descriptor ").nth(1))
            .filter_map(|l| l.split_once("): ").map(|(_, r)| r.to_owned()))
            .collect()
    }

    /// How many requests it forwarded to `http://{authority}/…`.
    pub fn requests_to(&self, authority: &str) -> usize {
        let prefix = format!("http://{authority}/");
        self.requests()
            .iter()
            .filter(|r| {
                r.split_whitespace()
                    .nth(1)
                    .is_some_and(|u| u.starts_with(&prefix))
            })
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

// === stalling relay ===

/// A TCP relay in front of a registry that can freeze answers mid-transfer:
/// while stalled, every connection stops forwarding the server's bytes after
/// the first [`Relay::STALL_AFTER`] of them (manifests pass, layers freeze).
pub struct Relay {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    /// Bytes of an answer that pass before a stall.
    pub const STALL_AFTER: usize = 64 * 1024;

    /// Relays to `target`.
    pub fn start(target: &str) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stall = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (target, st, sd, cl) = (
            target.to_owned(),
            stall.clone(),
            stalled.clone(),
            closed.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Set once this connection's answer is frozen.
                let frozen = Arc::new(AtomicBool::new(false));
                let (cl, frozen_in) = (cl.clone(), frozen.clone());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    // The client (containerd) closed its side of a frozen
                    // transfer: it gave the download up.
                    if frozen_in.load(Ordering::SeqCst) {
                        cl.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out, st, sd) = (server, client, st.clone(), sd.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    let mut sent = 0usize;
                    let mut counted = false;
                    loop {
                        while st.load(Ordering::SeqCst) && sent >= Relay::STALL_AFTER {
                            if !counted {
                                counted = true;
                                frozen.store(true, Ordering::SeqCst);
                                sd.fetch_add(1, Ordering::SeqCst);
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Relay {
            addr,
            stall,
            stalled,
            closed,
        }
    }

    /// Freezes (or releases) answers past the first bytes.
    pub fn stall(&self, on: bool) {
        self.stall.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many transfers are frozen, or were.
    pub fn stalled(&self) -> usize {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many frozen transfers the client side (containerd) has closed:
    /// downloads it gave up.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

// === recording relay ===

/// A TCP relay in front of a registry that keeps the head of every HTTP
/// request that passes it (containerd's pulls are GETs and HEADs without a
/// body): what a `hosts.toml` mirror receives, seen where it arrives.
pub struct Recorder {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Recorder {
    /// Relays to `target`, recording request heads.
    pub fn start(target: &str) -> Self {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (target, recorded) = (target.to_owned(), heads.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    let mut pending = Vec::new();
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                            recorded.lock().unwrap().push(head);
                            pending.drain(..end + 4);
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Recorder { addr, heads }
    }

    /// Every request head so far, `Authorization` values redacted (a test
    /// prints these; a token must not reach its output).
    pub fn requests(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| {
                h.lines()
                    .map(|l| match l.split_once(':') {
                        Some((name, _)) if name.eq_ignore_ascii_case("authorization") => {
                            format!("{name}: <redacted>")
                        }
                        _ => l.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n")
            })
            .collect()
    }

    /// How many `Authorization` headers it received so far.
    pub fn authorizations(&self) -> usize {
        self.requests()
            .iter()
            .flat_map(|h| h.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .count()
    }
}
