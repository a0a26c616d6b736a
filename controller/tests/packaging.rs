//! What the Debian package ships agrees with vmhad (issue 10, item 7): the
//! example `/etc/vmha/vmha.toml` is a valid configuration once uncommented,
//! vmhad's default `--config`, the unit's `ExecStart` and the package's
//! conffile are one path, and `--version` / `--generate-docs` work.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const CONFIG: &str = "/etc/vmha/vmha.toml";

fn packaging(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file)
}

/// The example with every `#`-commented setting (not the `##` prose) enabled.
fn uncommented(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("##"))
        .map(|l| l.strip_prefix('#').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_config_is_valid_once_uncommented() {
    let text = std::fs::read_to_string(packaging("vmha.toml")).unwrap();
    // As shipped, nothing is active.
    assert!(
        text.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "active lines in the example"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmha.toml");
    std::fs::write(&file, uncommented(&text)).unwrap();
    let config = vmha_controller::config::Config::load(&file).unwrap();
    assert_eq!(config.modules.len(), 1);
    assert_eq!(config.cluster.state_dir, Path::new("/var/lib/vmha"));
}

#[test]
fn one_config_path_everywhere() {
    let help = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains(&format!("[default: {CONFIG}]")),
        "vmhad's default config: {help}"
    );
    let unit = std::fs::read_to_string(packaging("systemd/vmhad.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=/usr/bin/vmhad --config /etc/vmha/vmha.toml ")),
        "{unit}"
    );
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"["../packaging/vmha.toml", "etc/vmha/vmha.toml", "644"]"#),
        "the package's conffile"
    );
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert!(readme.contains(CONFIG));
    assert!(
        !readme.contains("/etc/vmha/cluster.toml"),
        "README names another path"
    );
}

/// The unit's promises: notify with a watchdog, restarts on failure, only
/// vmhad signalled, no ExecStop, ordered after libvirtd.
#[test]
fn the_unit_is_notify_with_watchdog_and_kills_vmhad_alone() {
    let unit = std::fs::read_to_string(packaging("systemd/vmhad.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "KillMode=process",
        "After=network-online.target libvirtd.service",
        "Wants=network-online.target libvirtd.service",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
    assert!(!unit.lines().any(|l| l.starts_with("ExecStop")));
}

#[test]
fn version_and_generated_docs() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vmhad {}", env!("CARGO_PKG_VERSION"))
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .arg("--generate-docs")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(dir.path().join("man/vmhad.1")).unwrap();
    assert!(page.contains("\\-\\-node"), "{page}");
    assert!(
        !page.contains("fake\\-drivers"),
        "a hidden test flag in the man page"
    );
    assert!(dir.path().join("completions/bash/vmhad").is_file());
    assert!(dir.path().join("completions/zsh/_vmhad").is_file());
    // Without its DIR: a usage line and a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .arg("--generate-docs")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vmhad: usage: vmhad --generate-docs DIR"
    );
}
