//! The diagnostic report (`vmctl report`, the console's download button):
//! one tar.gz with what a support engineer asks for first, from both nodes,
//! like `crm_report`.
//!
//! Why it looks like this:
//! - Each node collects its own part ([`collect`]): the peer's comes over the
//!   daemon channel (`Message::Report`), so one command on either node gets
//!   both, and a node that cannot be reached is named in `errors.txt`
//!   instead of failing the report.
//! - A part is a list of small text files ([`ReportFile`]) with a byte
//!   budget: logs keep their newest lines, so the peer's part always fits in
//!   one channel message.
//! - Key material never enters it: the cluster key file is never read, and
//!   every `key_file`/password line of the configuration is redacted.
//! - What cannot be read (no journal, no domain XML on a SECOND whose
//!   replicated directory is not mounted) is listed in the part's
//!   `errors.txt`; nothing is fatal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::status::Status;

/// Bytes of file content a node's part may carry over the channel.
pub const PEER_BUDGET: usize = 640 * 1024;
/// Bytes of file content of the local part.
pub const LOCAL_BUDGET: usize = 8 * 1024 * 1024;
/// State-directory files larger than this are not data the report wants
/// (only their tail is kept).
const FILE_CAP: usize = 64 * 1024;
/// Lines of vmhad's journal.
const JOURNAL_LINES: &str = "1000";
/// The name every redacted value gets.
pub const REDACTED: &str = "(redacted)";

/// Errors writing the report archive.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write the report: {0}")]
    Write(#[from] std::io::Error),
}

/// One file of a node's part: its path inside the part and its text
/// (lossy UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFile {
    pub path: String,
    pub text: String,
}

/// What a node's part is collected from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub config: &'a Config,
    /// The configuration file (the running vmhad's); `None`: not included.
    pub config_file: Option<&'a Path>,
    /// This node's name.
    pub node: &'a str,
    /// The status view of this node's vmhad, if it answered.
    pub status: Option<&'a Status>,
    /// Bytes of content at most (logs are cut to their newest lines).
    pub budget: usize,
}

/// `text` with every value of a key naming secret material replaced by
/// [`REDACTED`] (`key_file`, `password`, `secret`, `token`).
pub fn redact_config(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        let key = trimmed
            .split_once('=')
            .map(|(k, _)| k.trim().to_ascii_lowercase());
        match key {
            Some(k)
                if !trimmed.starts_with('#')
                    && ["key", "password", "secret", "token"]
                        .iter()
                        .any(|w| k.contains(w)) =>
            {
                let indent = &line[..line.len() - trimmed.len()];
                out.push_str(&format!("{indent}{k} = \"{REDACTED}\""));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The last `cap` bytes of `text` (at a line start when possible).
fn tail(text: String, cap: usize) -> String {
    if text.len() <= cap {
        return text;
    }
    let mut start = text.len() - cap;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = text[start..]
        .find('\n')
        .map_or(start, |i| start + i + 1)
        .min(text.len());
    format!("[... {} bytes cut ...]\n{}", cut, &text[cut..])
}

fn read_lossy(path: &Path) -> std::io::Result<String> {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A binary's `--version` line: next to this executable, else on PATH.
fn version_of(binary: &str) -> String {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(binary)))
        .filter(|p| p.exists());
    let program = sibling.unwrap_or_else(|| PathBuf::from(binary));
    match Command::new(&program).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => format!(
            "{}: --version failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("{}: {e}", program.display()),
    }
}

/// Collects this node's part. Never fails: what cannot be read is listed in
/// `errors.txt`.
pub fn collect(source: &Source<'_>) -> Vec<ReportFile> {
    let mut files: Vec<ReportFile> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let config = source.config;
    // The order is the priority: what comes first is cut last.
    let mut add = |path: String, text: String| files.push(ReportFile { path, text });
    match source.config_file {
        Some(path) => match read_lossy(path) {
            Ok(text) => add("vmha.toml".into(), redact_config(&text)),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        },
        None => errors.push("the configuration file is not known".into()),
    }
    add(
        "versions.txt".into(),
        ["vmhad", "vmctl", "vmha-fs"]
            .iter()
            .map(|b| format!("{b}: {}\n", version_of(b)))
            .collect(),
    );
    match source.status {
        Some(status) => add(
            "status.json".into(),
            serde_json::to_string_pretty(status).unwrap_or_default(),
        ),
        None => errors.push("vmhad did not answer: no status.json".into()),
    }
    let kernel: String = ["/proc/sys/kernel/osrelease", "/proc/version"]
        .iter()
        .filter_map(|p| read_lossy(Path::new(p)).ok())
        .collect();
    add("kernel.txt".into(), kernel);
    match read_lossy(Path::new("/proc/self/mounts")) {
        Ok(text) => add("mounts.txt".into(), text),
        Err(e) => errors.push(format!("/proc/self/mounts: {e}")),
    }
    let mut logs = Vec::new();
    for module in &config.modules {
        let dir = config.cluster.state_dir.join(&module.name);
        let mut state = Vec::new();
        state_files(&dir, &module.name, 0, &mut state, &mut errors);
        for (path, text) in state {
            if path.ends_with("events.log") {
                logs.push((path, text));
            } else {
                add(path, tail(text, FILE_CAP));
            }
        }
        if let Some(first) = module.replicated.first() {
            let xml = first.join(format!("{}.xml", module.domain));
            match read_lossy(&xml) {
                Ok(text) => add(format!("{}/domain.xml", module.name), tail(text, FILE_CAP)),
                Err(e) => errors.push(format!("{}: {e}", xml.display())),
            }
        }
    }
    match Command::new("journalctl")
        .args(["-u", "vmhad", "-n", JOURNAL_LINES, "--no-pager"])
        .output()
    {
        Ok(out) if out.status.success() => {
            logs.push((
                "journal-vmhad.txt".into(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        Ok(out) => errors.push(format!(
            "journalctl -u vmhad: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => errors.push(format!("journalctl: {e} (skipped)")),
    }
    // Logs share what the budget leaves, newest lines kept.
    let used: usize = files.iter().map(|f| f.text.len()).sum();
    let left = source.budget.saturating_sub(used + 4096);
    let share = left / logs.len().max(1);
    for (path, text) in logs {
        files.push(ReportFile {
            path,
            text: tail(text, share),
        });
    }
    let mut total = 0;
    files.retain(|f| {
        total += f.text.len();
        total <= source.budget
    });
    errors.insert(0, format!("node {}", source.node));
    files.push(ReportFile {
        path: "errors.txt".into(),
        text: errors.join("\n") + "\n",
    });
    files
}

/// The module's state directory: its event log and the vmha-fs state files
/// of each `fs<i>` (markers, `sync.json`, `link.json`, `verify.json`, ...),
/// never a lock or socket, never more than two levels.
fn state_files(
    dir: &Path,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, String)>,
    errors: &mut Vec<String>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(format!("{}: {e}", dir.display()));
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = format!("{prefix}/{name}");
        if kind.is_dir() && depth < 1 {
            state_files(&entry.path(), &path, depth + 1, out, errors);
        } else if kind.is_file() && !name.ends_with(".lock") && !name.contains("key") {
            match read_lossy(&entry.path()) {
                Ok(text) => out.push((path, text)),
                Err(e) => errors.push(format!("{}: {e}", entry.path().display())),
            }
        }
    }
}

/// Writes the archive: `vmha-report/<node>/<path>` for each part, and
/// `vmha-report/README.txt`.
pub fn write_tar_gz(
    out: impl Write,
    parts: &[(String, Vec<ReportFile>)],
    notes: &[String],
) -> Result<(), ReportError> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut append = |path: &str, text: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(now);
        header.set_cksum();
        tar.append_data(&mut header, path, text)
    };
    let mut readme = String::from(
        "vmha diagnostic report (vmctl report): one directory per node.\n\
         Key material is never included; key_file and password values are redacted.\n",
    );
    for note in notes {
        readme.push_str(note);
        readme.push('\n');
    }
    append("vmha-report/README.txt", readme.as_bytes())?;
    for (node, files) in parts {
        for f in files {
            // A peer's path is data: no absolute path, no `..`.
            let clean: Vec<&str> = f
                .path
                .split('/')
                .filter(|c| !c.is_empty() && *c != "." && *c != "..")
                .collect();
            if clean.is_empty() {
                continue;
            }
            let node = node.replace(['/', '.'], "_");
            append(
                &format!("vmha-report/{node}/{}", clean.join("/")),
                f.text.as_bytes(),
            )?;
        }
    }
    let gz = tar.into_inner()?;
    gz.finish()?.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_are_redacted() {
        let text = "[cluster]\nkey_file = \"/etc/vmha/cluster.key\"\nname = \"x\"\n[web]\n  key_file = \"/k.pem\"\n# key_file = \"/c\"\n";
        let r = redact_config(text);
        assert!(!r.contains("cluster.key") && !r.contains("k.pem"), "{r}");
        assert!(r.contains("name = \"x\"") && r.contains("# key_file = \"/c\""));
        assert!(r.contains("  key_file = \"(redacted)\""));
    }

    #[test]
    fn tail_keeps_the_newest_lines() {
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let t = tail(text, 100);
        assert!(t.ends_with("line 999\n") && t.len() < 140, "{t}");
        assert!(!t.contains("line 1\n"));
    }

    #[test]
    fn archive_paths_stay_inside_the_node_directory() {
        let mut buf = Vec::new();
        let files = vec![ReportFile {
            path: "../../etc/x".into(),
            text: "x".into(),
        }];
        write_tar_gz(&mut buf, &[("node1".into(), files)], &[]).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&buf[..]));
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["vmha-report/README.txt", "vmha-report/node1/etc/x"]);
    }
}
