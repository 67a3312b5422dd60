//! containerd's own configuration, read the way containerd reads it: its
//! config file with `imports` merged (the CRI plugin's sandbox image and
//! registry `config_path`), and the `hosts.toml` files under that path,
//! which decide the host a pull is finally sent to.
//!
//! These are plain file reads; code on the runtime runs them on the
//! blocking pool.

use std::path::{Path, PathBuf};

/// A CRI setting in containerd's config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CriSetting {
    /// The sandbox (pause) image: schema version 2
    /// `plugins."io.containerd.grpc.v1.cri".sandbox_image`, version 3
    /// `plugins."io.containerd.cri.v1.images".pinned_images.sandbox`, the
    /// unversioned 1.x schema `plugins.cri.sandbox_image`.
    SandboxImage,
    /// Where `hosts.toml` directories live: `registry.config_path` in the
    /// same plugin sections.
    RegistryConfigPath,
}

impl CriSetting {
    /// The plugin and the key path of this setting in schema `version`.
    fn location(self, version: Option<i64>) -> (&'static str, &'static [&'static str]) {
        let plugin = match version {
            Some(3) => "io.containerd.cri.v1.images",
            Some(2) => "io.containerd.grpc.v1.cri",
            _ => "cri",
        };
        let path: &'static [&'static str] = match (self, version) {
            (CriSetting::SandboxImage, Some(3)) => &["pinned_images", "sandbox"],
            (CriSetting::SandboxImage, _) => &["sandbox_image"],
            (CriSetting::RegistryConfigPath, _) => &["registry", "config_path"],
        };
        (plugin, path)
    }
}

/// `setting` as one config file names it (this file alone;
/// [`cri_setting_from_files`] follows `imports`).
pub fn cri_setting(text: &str, setting: CriSetting) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let version = table.get("version").and_then(toml::Value::as_integer);
    section(&table, version, setting)?
}

/// `setting` in one parsed config file: `None` when the file has no section
/// of that plugin at all, `Some(None)` when the section is there but does
/// not set it.
fn section(
    table: &toml::Table,
    version: Option<i64>,
    setting: CriSetting,
) -> Option<Option<String>> {
    let plugins = table.get("plugins")?.as_table()?;
    let (plugin, path) = setting.location(version);
    let mut value = plugins.get(plugin)?;
    for key in path {
        match value.get(key) {
            Some(v) => value = v,
            None => return Some(None),
        }
    }
    Some(value.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
}

/// At most this many files (the main one and its imports) are read to learn
/// a setting of containerd's.
pub const MAX_CONFIG_FILES: usize = 64;

/// What containerd's config files say of one setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The value, when a file sets it.
    pub value: Option<String>,
    /// The file whose plugin section decided (the last one that has it).
    pub file: Option<PathBuf>,
    /// The main file's schema version (`None` when unversioned or unread).
    pub version: Option<i64>,
    /// Whether the main file could be read.
    pub read: bool,
}

/// `setting` as containerd's config names it, reading its `imports` as
/// containerd does: the main file first, then each import in order
/// (relative paths from the importing file's directory, globs expanded in
/// name order, every file once); a later file's plugin section replaces an
/// earlier one whole, so the last file with that plugin's section decides.
/// Imports carry the main file's schema version unless they set their own.
pub fn find_cri_setting(main: &Path, setting: CriSetting) -> Found {
    let mut pending = std::collections::VecDeque::from([main.to_path_buf()]);
    let mut loaded = std::collections::HashSet::new();
    let mut found = Found {
        value: None,
        file: None,
        version: None,
        read: false,
    };
    while let Some(path) = pending.pop_front() {
        if loaded.len() >= MAX_CONFIG_FILES || !loaded.insert(path.clone()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(table) = text.parse::<toml::Table>() else {
            continue;
        };
        let version = table.get("version").and_then(toml::Value::as_integer);
        if loaded.len() == 1 {
            found.version = version;
            found.read = true;
        }
        if let Some(value) = section(&table, version.or(found.version), setting) {
            found.value = value;
            found.file = Some(path.clone());
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        let imports = table.get("imports").and_then(toml::Value::as_array);
        for import in imports
            .into_iter()
            .flatten()
            .filter_map(toml::Value::as_str)
        {
            let import = dir.join(import);
            if import.to_string_lossy().contains(['*', '?', '[']) {
                let matches = glob::glob(&import.to_string_lossy()).into_iter().flatten();
                let mut matches: Vec<PathBuf> = matches.flatten().collect();
                matches.sort();
                pending.extend(matches);
            } else {
                pending.push_back(import);
            }
        }
    }
    found
}

/// The value of `setting` in containerd's config files and the file that
/// set it, when one does.
pub fn cri_setting_from_files(main: &Path, setting: CriSetting) -> Option<(String, PathBuf)> {
    let found = find_cri_setting(main, setting);
    Some((found.value?, found.file?))
}

// === hosts.toml ===

/// containerd 2.x's `config_path` when its config sets none (its
/// `containerd config default`); containerd 1.x has none by default.
pub const DEFAULT_CONFIG_PATH_V2: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";

/// Where containerd looks for `hosts.toml` directories: the `config_path`
/// its config sets (a `:`-separated list), else containerd 2.x's default
/// for a version 3 config or a node without a config file.
pub fn registry_config_path(main: &Path) -> Vec<PathBuf> {
    let found = find_cri_setting(main, CriSetting::RegistryConfigPath);
    let list = match found.value {
        Some(v) => v,
        None if !found.read || found.version == Some(3) => DEFAULT_CONFIG_PATH_V2.to_owned(),
        None => return Vec::new(),
    };
    std::env::split_paths(&list)
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// containerd's directory name for a host with a port: `host_port_`
/// (`:` is avoided in paths), tried before `host:port`.
fn host_directory(host: &str) -> Option<String> {
    let (name, port) = host.rsplit_once(':')?;
    (!name.is_empty()).then(|| format!("{name}_{port}_"))
}

/// The directory containerd reads for `host` under `roots`: for each root
/// in turn, `host_port_`, `host`, then `_default` (containerd ≥ 1.7); the
/// first that exists.
fn host_dir(roots: &[PathBuf], host: &str) -> Option<PathBuf> {
    for root in roots {
        let mut names: Vec<String> = host_directory(host).into_iter().collect();
        names.push(host.to_owned());
        names.push("_default".to_owned());
        for name in names {
            let dir = root.join(name);
            if dir.exists() {
                return Some(dir);
            }
        }
    }
    None
}

/// The host containerd sends a pull for `host` to in the end, as a URL with
/// its scheme (`https://host` or what `hosts.toml` says): the `server` of
/// the `hosts.toml` containerd reads for `host`, else the registry itself.
/// Mirrors (`[host."…"]` entries) are tried before it, and are not it.
///
/// containerd's CRI gives a pull's credentials only to a contacted host
/// whose `host:port` equals this URL's (`ParseAuth` compares `url.Parse`'s
/// `Host`); a bare `host:port` does not parse, hence the scheme.
pub fn final_server(roots: &[PathBuf], host: &str) -> String {
    let server = host_dir(roots, host)
        .and_then(|dir| std::fs::read_to_string(dir.join("hosts.toml")).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("server")?.as_str().map(str::to_owned))
        .filter(|s| !s.is_empty());
    match server {
        Some(s) => scheme_and_host(&s),
        None => default_server(host),
    }
}

/// `server` reduced to `scheme://host[:port]`; containerd prefixes
/// `https://` to a value that does not start with `http`.
fn scheme_and_host(server: &str) -> String {
    let with_scheme = if server.starts_with("http") {
        server.to_owned()
    } else {
        format!("https://{server}")
    };
    match with_scheme.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            format!("{scheme}://{authority}")
        }
        None => with_scheme,
    }
}

/// The host containerd contacts for `host` when no `hosts.toml` names a
/// server (Docker Hub's name is not its API host).
pub fn default_server(host: &str) -> String {
    match host {
        "docker.io" => "https://registry-1.docker.io".to_owned(),
        _ => format!("https://{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_config_files_name_their_sandbox_image_in_every_schema() {
        let image = |text: &str| cri_setting(text, CriSetting::SandboxImage);
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5\"\n";
        assert_eq!(
            image(v2).as_deref(),
            Some("602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5")
        );
        let v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"registry.k8s.io/pause:3.10\"\n";
        assert_eq!(image(v3).as_deref(), Some("registry.k8s.io/pause:3.10"));
        let v1 = "[plugins.cri]\n  sandbox_image = \"k8s.gcr.io/pause:3.2\"\n";
        assert_eq!(image(v1).as_deref(), Some("k8s.gcr.io/pause:3.2"));
        // A version 2 file does not read version 3's key, and the reverse.
        let mixed = "version = 2\n[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"x/pause:1\"\n";
        assert_eq!(image(mixed), None);
        for nothing in [
            "",
            "version = 2\n",
            "not toml [",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"\"\n",
        ] {
            assert_eq!(image(nothing), None, "{nothing:?}");
        }
        assert_eq!(
            cri_setting_from_files(
                Path::new("/nonexistent/config.toml"),
                CriSetting::SandboxImage
            ),
            None
        );
    }

    #[test]
    fn registry_config_path_is_read_in_every_schema() {
        let path = |text: &str| cri_setting(text, CriSetting::RegistryConfigPath);
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        assert_eq!(path(v2).as_deref(), Some("/etc/containerd/certs.d"));
        let v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/a:/b\"\n";
        assert_eq!(path(v3).as_deref(), Some("/a:/b"));
        let v1 = "[plugins.cri.registry]\n  config_path = \"/c\"\n";
        assert_eq!(path(v1).as_deref(), Some("/c"));
    }

    #[test]
    fn config_path_defaults_follow_containerd_versions() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let default: Vec<PathBuf> = vec![
            "/etc/containerd/certs.d".into(),
            "/etc/docker/certs.d".into(),
        ];
        // containerd 2.x: a version 3 file without the key, or no file.
        assert_eq!(
            registry_config_path(&write("v3.toml", "version = 3\n")),
            default
        );
        assert_eq!(
            registry_config_path(&dir.path().join("missing.toml")),
            default
        );
        // containerd 1.x has no default.
        assert!(registry_config_path(&write("v2.toml", "version = 2\n")).is_empty());
        let set = write(
            "set.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/x/certs.d:/y\"\n",
        );
        assert_eq!(
            registry_config_path(&set),
            vec![PathBuf::from("/x/certs.d"), PathBuf::from("/y")]
        );
    }

    #[test]
    fn containerd_config_imports_are_followed_as_containerd_merges_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |name: &str, text: &str| {
            let p = d.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            p
        };
        let image = |main: &Path| cri_setting_from_files(main, CriSetting::SandboxImage);
        let cri = |image: &str| {
            format!("[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{image}\"\n")
        };
        // The main file names one image; a glob import, read in name order,
        // names another in its last file: the last one wins.
        let main = write(
            "config.toml",
            &format!(
                "version = 2\nimports = [\"conf.d/*.toml\"]\n{}",
                cri("main/pause:1")
            ),
        );
        write("conf.d/10-a.toml", &cri("a/pause:1"));
        let b = write("conf.d/20-b.toml", &cri("b/pause:1"));
        write(
            "conf.d/30-other.toml",
            "[plugins.\"io.containerd.grpc.v1.other\"]\n  x = 1\n",
        );
        assert_eq!(image(&main), Some(("b/pause:1".to_owned(), b.clone())));
        // A later section without the key replaces the earlier one whole:
        // containerd then uses its built-in default.
        write(
            "conf.d/40-empty.toml",
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  enable_selinux = false\n",
        );
        assert_eq!(image(&main), None);
        // Absolute imports, import cycles and missing files.
        let other = write(
            "elsewhere/x.toml",
            &format!(
                "version = 2\nimports = [{:?}, \"/nonexistent.toml\"]\n{}",
                main.display().to_string(),
                cri("x/pause:1")
            ),
        );
        let main2 = write(
            "main2.toml",
            &format!(
                "version = 2\nimports = [{:?}]\n",
                other.display().to_string()
            ),
        );
        std::fs::remove_file(d.join("conf.d/40-empty.toml")).unwrap();
        assert_eq!(image(&main2), Some(("b/pause:1".to_owned(), b)));
        // Version 3: the images plugin's pinned sandbox image.
        let v3 = write(
            "v3/config.toml",
            "version = 3\nimports = [\"extra.toml\"]\n",
        );
        let extra = write(
            "v3/extra.toml",
            "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.10\"\n",
        );
        assert_eq!(
            image(&v3),
            Some((
                "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.10".to_owned(),
                extra
            ))
        );
    }

    #[test]
    fn the_final_server_is_what_hosts_toml_names_else_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let roots = [dir.path().join("a"), dir.path().join("b")];
        let hosts = |root: &Path, name: &str, text: &str| {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("hosts.toml"), text).unwrap();
        };
        let ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
        // Nothing configured: the registry itself.
        assert_eq!(final_server(&roots, ecr), format!("https://{ecr}"));
        assert_eq!(
            final_server(&[], "docker.io"),
            "https://registry-1.docker.io"
        );
        // A mirror first, the server last: the server is where it ends.
        hosts(
            &roots[1],
            ecr,
            "server = \"http://127.0.0.1:5000/v2\"\n[host.\"http://127.0.0.1:6000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        );
        assert_eq!(final_server(&roots, ecr), "http://127.0.0.1:5000");
        // The first root with a directory for the host decides.
        hosts(&roots[0], ecr, "[host.\"https://mirror.example\"]\n");
        assert_eq!(final_server(&roots, ecr), format!("https://{ecr}"));
        // A server without a scheme is https, as containerd reads it.
        hosts(&roots[0], ecr, "server = \"pull.example:8443\"\n");
        assert_eq!(final_server(&roots, ecr), "https://pull.example:8443");
        // host:port is looked up as host_port_ first, then host:port.
        hosts(
            &roots[0],
            "mirror.internal:5000",
            "server = \"https://b.example\"\n",
        );
        assert_eq!(
            final_server(&roots, "mirror.internal:5000"),
            "https://b.example"
        );
        hosts(
            &roots[0],
            "mirror.internal_5000_",
            "server = \"https://a.example\"\n",
        );
        assert_eq!(
            final_server(&roots, "mirror.internal:5000"),
            "https://a.example"
        );
        // _default serves every host without a directory of its own.
        hosts(
            &roots[0],
            "_default",
            "server = \"https://default.example\"\n",
        );
        assert_eq!(
            final_server(&roots, "other.example"),
            "https://default.example"
        );
        // An unreadable hosts.toml: containerd uses the registry itself.
        hosts(&roots[0], "broken.example", "server = [");
        assert_eq!(
            final_server(&roots, "broken.example"),
            "https://broken.example"
        );
    }
}
