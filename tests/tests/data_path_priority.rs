//! The data path of both nodes runs ahead of the guests' threads: every thread
//! of a primary and of a secondary that carries replicated writes (FUSE
//! workers, the link's sender and acknowledgement threads, the receiver's
//! session and fsync threads) runs at nice -5 (vmhad's heartbeat thread runs at
//! -10, above them). On a loaded CPU a replicated write crosses several threads,
//! each waiting for a share of a CPU: at nice 0 behind every busy guest thread.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use vmha_fs::runtime::DATA_PATH_NICE;
use vmha_test_infra::{Pair, PairOptions};

/// (thread name, nice) of every thread of `pid`.
fn threads(pid: u32) -> Result<Vec<(String, i32)>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue; // ended meanwhile
        };
        // Fields after the command name; nice is field 19 (index 16 after it).
        let rest = stat.rsplit_once(')').context("stat")?.1;
        let nice: i32 = rest
            .split_whitespace()
            .nth(16)
            .context("nice field")?
            .parse()?;
        out.push((comm.trim().to_owned(), nice));
    }
    Ok(out)
}

#[test]
fn replication_threads_run_at_the_data_path_priority() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    // One replicated write, so that the receiver's session threads exist.
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(pair.mount().join("f"))?;
    f.write_all_at(&[1u8; 4096], 0)?;
    f.sync_all()?;
    let (Some(p), Some(s)) = (pair.primary_pid(), pair.secondary_pid()) else {
        bail!("pair not running");
    };
    let (primary, secondary) = (threads(p)?, threads(s)?);
    eprintln!("[priority] primary {primary:?}\n[priority] secondary {secondary:?}");
    let check = |all: &[(String, i32)], prefix: &str| -> Result<()> {
        let found: Vec<_> = all.iter().filter(|(n, _)| n.starts_with(prefix)).collect();
        if found.is_empty() {
            bail!("no thread named {prefix}*: {all:?}");
        }
        for (name, nice) in found {
            if *nice != DATA_PATH_NICE {
                bail!("thread {name} runs at nice {nice}, not {DATA_PATH_NICE}");
            }
        }
        Ok(())
    };
    check(&primary, "link-acks")?;
    check(&primary, "link-send")?;
    check(&secondary, "recv-")?;
    Ok(())
}
