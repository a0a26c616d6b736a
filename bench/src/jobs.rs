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
pub const ALL: [Job; 6] = [
    Job {
        name: "seqwrite",
        rw: "write",
        bs: "1M",
        iodepth: 4,
        ioengine: "libaio",
        fdatasync: false,
    },
    // One 1 MiB write at a time: the latency of a large write, no overlap.
    Job {
        name: "seqwrite-qd1",
        rw: "write",
        bs: "1M",
        iodepth: 1,
        ioengine: "psync",
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

/// The files one job writes: `file` itself, and with `copies` = 2 a twin next to
/// it written at the same time (the "two copies on one disk" baseline).
pub fn copy_files(file: &Path, copies: u32) -> Vec<std::path::PathBuf> {
    (0..copies.max(1))
        .map(|i| {
            if i == 0 {
                file.to_path_buf()
            } else {
                let mut name = file.as_os_str().to_owned();
                name.push(format!(".copy{i}"));
                name.into()
            }
        })
        .collect()
}

/// One job section per copy, each on its own file, all running at once.
fn sections(out: &mut String, name: &str, file: &Path, copies: u32) {
    for (i, f) in copy_files(file, copies).iter().enumerate() {
        if i == 0 {
            let _ = writeln!(out, "[{name}]");
        } else {
            let _ = writeln!(out, "[{name}-copy{i}]");
        }
        let _ = writeln!(out, "filename={}", f.display());
    }
}

/// Options shared by the measured job and the prefill.
fn global(out: &mut String, size: &str) {
    let _ = writeln!(out, "[global]");
    let _ = writeln!(out, "size={size}");
    // The file is prefilled; never let fio preallocate or re-lay it out
    // (FUSE fallocate support differs between targets).
    let _ = writeln!(out, "fallocate=none");
    let _ = writeln!(out, "overwrite=1");
    let _ = writeln!(out, "group_reporting=1");
}

/// The measured job: time based, O_DIRECT. With `copies` > 1 the same job runs
/// that many times at once, each on its own file (fio sums them: divide by
/// `copies` for the rate of one copy).
pub fn job_file(job: &Job, file: &Path, size: &str, runtime_s: u64, copies: u32) -> String {
    let mut s = String::new();
    global(&mut s, size);
    let _ = writeln!(s, "time_based=1");
    let _ = writeln!(s, "runtime={runtime_s}");
    let _ = writeln!(s, "direct=1");
    let _ = writeln!(s, "rw={}", job.rw);
    let _ = writeln!(s, "bs={}", job.bs);
    let _ = writeln!(s, "iodepth={}", job.iodepth);
    let _ = writeln!(s, "ioengine={}", job.ioengine);
    if job.fdatasync {
        let _ = writeln!(s, "fdatasync=1");
    }
    sections(&mut s, job.name, file, copies);
    s
}

/// Writes the whole file once before timing, so every target measures
/// overwrites/reads of allocated data, not hole filling.
pub fn prefill_file(file: &Path, size: &str, copies: u32) -> String {
    let mut s = String::new();
    global(&mut s, size);
    let _ = writeln!(s, "rw=write");
    let _ = writeln!(s, "bs=1M");
    let _ = writeln!(s, "ioengine=psync");
    let _ = writeln!(s, "end_fsync=1");
    sections(&mut s, "prefill", file, copies);
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
    fn two_copies_run_two_jobs_on_two_files_at_once() {
        let job = ALL[2];
        let text = job_file(&job, Path::new("/x/y.dat"), "1G", 20, 2);
        assert!(text.contains("[randwrite-sync]\nfilename=/x/y.dat\n"));
        assert!(text.contains("[randwrite-sync-copy1]\nfilename=/x/y.dat.copy1\n"));
        // Concurrent: no stonewall between them.
        assert!(!text.contains("stonewall"));
        let prefill = prefill_file(Path::new("/x/y.dat"), "1G", 2);
        assert!(prefill.contains("filename=/x/y.dat.copy1\n"));
        let one = job_file(&job, Path::new("/x/y.dat"), "1G", 20, 1);
        assert!(!one.contains("copy1"));
    }

    #[test]
    fn qd1_sequential_job_is_psync_1m() {
        let job = select(Some("seqwrite-qd1")).unwrap_or_default()[0];
        assert_eq!((job.bs, job.iodepth, job.ioengine), ("1M", 1, "psync"));
    }

    #[test]
    fn sync_job_file_has_fdatasync_and_psync() {
        let job = ALL[2];
        let text = job_file(&job, Path::new("/x/y.dat"), "1G", 20, 1);
        assert!(text.contains("fdatasync=1\n"));
        assert!(text.contains("ioengine=psync\n"));
        assert!(text.contains("filename=/x/y.dat\n"));
        assert!(text.contains("direct=1\n"));
    }
}
