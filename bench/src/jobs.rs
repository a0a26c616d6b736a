//! The fio job set and the job files rendered from it.

use anyhow::{bail, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One fio job of the benchmark set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    pub ioengine: &'static str,
    /// fdatasync after every write: a durable write, as a guest flush does.
    pub fdatasync: bool,
}

impl Job {
    /// True when the job writes (its numbers are in fio's "write" section).
    pub fn writes(&self) -> bool {
        self.rw.contains("write")
    }
}

/// All jobs, in run order.
pub const ALL: [Job; 5] = [
    Job {
        name: "seqwrite",
        rw: "write",
        bs: "1M",
        iodepth: 4,
        ioengine: "libaio",
        fdatasync: false,
    },
    Job {
        name: "randwrite-sync",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        ioengine: "psync",
        fdatasync: true,
    },
    Job {
        name: "randwrite-qd16",
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        ioengine: "libaio",
        fdatasync: false,
    },
    Job {
        name: "randread-qd16",
        rw: "randread",
        bs: "4k",
        iodepth: 16,
        ioengine: "libaio",
        fdatasync: false,
    },
    Job {
        name: "seqread",
        rw: "read",
        bs: "1M",
        iodepth: 4,
        ioengine: "libaio",
        fdatasync: false,
    },
];

/// Jobs named in a comma list (all when `None`), kept in run order.
pub fn select(list: Option<&str>) -> Result<Vec<Job>> {
    let Some(list) = list else {
        return Ok(ALL.to_vec());
    };
    let wanted: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for w in &wanted {
        if !ALL.iter().any(|j| j.name == *w) {
            let names: Vec<&str> = ALL.iter().map(|j| j.name).collect();
            bail!("unknown job {w:?}; known: {}", names.join(","));
        }
    }
    if wanted.is_empty() {
        bail!("--jobs is empty");
    }
    Ok(ALL
        .iter()
        .filter(|j| wanted.contains(&j.name))
        .copied()
        .collect())
}

/// Options shared by the measured job and the prefill.
fn global(out: &mut String, file: &Path, size: &str) {
    let _ = writeln!(out, "[global]");
    let _ = writeln!(out, "filename={}", file.display());
    let _ = writeln!(out, "size={size}");
    // The file is prefilled; never let fio preallocate or re-lay it out
    // (FUSE fallocate support differs between targets).
    let _ = writeln!(out, "fallocate=none");
    let _ = writeln!(out, "overwrite=1");
    let _ = writeln!(out, "group_reporting=1");
}

/// The measured job: time based, O_DIRECT.
pub fn job_file(job: &Job, file: &Path, size: &str, runtime_s: u64) -> String {
    let mut s = String::new();
    global(&mut s, file, size);
    let _ = writeln!(s, "time_based=1");
    let _ = writeln!(s, "runtime={runtime_s}");
    let _ = writeln!(s, "direct=1");
    let _ = writeln!(s, "[{}]", job.name);
    let _ = writeln!(s, "rw={}", job.rw);
    let _ = writeln!(s, "bs={}", job.bs);
    let _ = writeln!(s, "iodepth={}", job.iodepth);
    let _ = writeln!(s, "ioengine={}", job.ioengine);
    if job.fdatasync {
        let _ = writeln!(s, "fdatasync=1");
    }
    s
}

/// Writes the whole file once before timing, so every target measures
/// overwrites/reads of allocated data, not hole filling.
pub fn prefill_file(file: &Path, size: &str) -> String {
    let mut s = String::new();
    global(&mut s, file, size);
    let _ = writeln!(s, "[prefill]");
    let _ = writeln!(s, "rw=write");
    let _ = writeln!(s, "bs=1M");
    let _ = writeln!(s, "ioengine=psync");
    let _ = writeln!(s, "end_fsync=1");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_run_order_and_rejects_unknown() -> Result<()> {
        let names: Vec<&str> = select(Some("seqread,seqwrite"))?
            .iter()
            .map(|j| j.name)
            .collect();
        assert_eq!(names, ["seqwrite", "seqread"]);
        assert!(select(Some("nope")).is_err());
        assert_eq!(select(None)?.len(), ALL.len());
        Ok(())
    }

    #[test]
    fn sync_job_file_has_fdatasync_and_psync() {
        let job = ALL[1];
        let text = job_file(&job, Path::new("/x/y.dat"), "1G", 20);
        assert!(text.contains("fdatasync=1\n"));
        assert!(text.contains("ioengine=psync\n"));
        assert!(text.contains("filename=/x/y.dat\n"));
        assert!(text.contains("direct=1\n"));
    }
}
