//! Man pages and shell completions generated from a binary's own clap
//! definition, so they say exactly what `--help` says.
//!
//! Each binary answers `BINARY --generate-docs DIR` before its normal argument
//! parsing (the flag is not part of its interface and not in `--help`; a
//! command-line flag rather than an environment variable, which every child
//! process would inherit). `make deb` runs it for the three binaries and
//! packages what it writes:
//! - `DIR/man/BINARY.1`, and `BINARY-SUBCOMMAND.1` for each subcommand;
//! - `DIR/completions/bash/BINARY` (bash-completion's name for it);
//! - `DIR/completions/zsh/_BINARY`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

/// The first argument that asks for the documents.
pub const FLAG: &str = "--generate-docs";

/// Why the documents could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("usage: {binary} {FLAG} DIR")]
    Usage { binary: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `Some(exit code)` when the process was started as `BINARY --generate-docs
/// DIR`: the documents of `command()` were written (or the error printed as
/// one line); `None` otherwise: the binary goes on as usual.
pub fn run_if_asked(command: impl FnOnce() -> clap::Command) -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().map(OsString::as_os_str) != Some(FLAG.as_ref()) {
        return None;
    }
    let command = command();
    let name = command.get_name().to_string();
    let result = match args.as_slice() {
        [_, dir] => generate(command, Path::new(dir)).map(|_| ()),
        _ => Err(DocsError::Usage {
            binary: name.clone(),
        }),
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Writes the man pages and completions of `command` under `dir` and returns
/// the files written.
pub fn generate(command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let name = command.get_name().to_string();
    let man = dir.join("man");
    let bash = dir.join("completions/bash");
    let zsh = dir.join("completions/zsh");
    for d in [&man, &bash, &zsh] {
        std::fs::create_dir_all(d).map_err(|source| DocsError::Write {
            path: d.clone(),
            source,
        })?;
    }
    clap_mangen::generate_to(command.clone(), &man).map_err(|source| DocsError::Write {
        path: man.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for (shell, path) in [
        (Shell::Bash, bash.join(&name)),
        (Shell::Zsh, zsh.join(format!("_{name}"))),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), &name, &mut out);
        std::fs::write(&path, out).map_err(|source| DocsError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    let pages = std::fs::read_dir(&man).map_err(|source| DocsError::Write {
        path: man.clone(),
        source,
    })?;
    written.extend(pages.filter_map(|e| e.ok().map(|e| e.path())));
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pages_and_completions_for_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let command = clap::Command::new("demo")
            .version("1.2.3")
            .about("Demo tool")
            .arg(clap::Arg::new("config").long("config").help("The file"))
            .subcommand(clap::Command::new("status").about("Show the status"));
        let written = generate(command, dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "completions/bash/demo",
                "completions/zsh/_demo",
                "man/demo-status.1",
                "man/demo.1"
            ]
        );
        let page = std::fs::read_to_string(dir.path().join("man/demo.1")).unwrap();
        assert!(page.contains("\\-\\-config"), "{page}");
        assert!(page.contains("1.2.3"), "{page}");
        let bash = std::fs::read_to_string(dir.path().join("completions/bash/demo")).unwrap();
        assert!(bash.contains("complete -F"), "{bash}");
        assert!(bash.contains("status"), "{bash}");
        let zsh = std::fs::read_to_string(dir.path().join("completions/zsh/_demo")).unwrap();
        assert!(zsh.starts_with("#compdef demo"), "{zsh}");
    }
}
