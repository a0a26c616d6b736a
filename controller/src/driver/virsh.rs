//! libvirt through the `virsh` command line: a real [`VmDriver`] without
//! linking libvirt (a `virt`-crate driver can replace it behind the same trait).

use std::process::Command;
use std::time::{Duration, Instant};

use super::{DriverError, VmDriver, VmState};
use crate::config::Module;

/// How long `start` waits for the domain to run.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// Runs `virsh -c URI ...`.
#[derive(Debug, Clone)]
pub struct VirshDriver {
    pub virsh: String,
}

impl Default for VirshDriver {
    fn default() -> Self {
        VirshDriver {
            virsh: "virsh".to_string(),
        }
    }
}

impl VirshDriver {
    fn run(&self, module: &Module, args: &[&str]) -> Result<String, DriverError> {
        let what = format!("virsh {}", args.join(" "));
        let out = Command::new(&self.virsh)
            .arg("-c")
            .arg(&module.libvirt_uri)
            .args(args)
            .output()
            .map_err(|e| DriverError::failed(&what, e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(DriverError::failed(
                what,
                String::from_utf8_lossy(&out.stderr).trim(),
            ))
        }
    }

    fn wait_for(&self, module: &Module, timeout: Duration, done: fn(VmState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.state(module).is_ok_and(done) {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }
}

/// Maps `virsh domstate` output.
pub fn parse_domstate(text: &str) -> VmState {
    match text.trim() {
        "running" | "in shutdown" | "blocked" => VmState::Running,
        "paused" | "pmsuspended" => VmState::Paused,
        "crashed" => VmState::Crashed,
        _ => VmState::ShutOff,
    }
}

impl VmDriver for VirshDriver {
    fn define(&self, module: &Module) -> Result<(), DriverError> {
        let dir = module
            .replicated
            .first()
            .ok_or_else(|| DriverError::failed("define", "no replicated directory"))?;
        let xml = dir.join(format!("{}.xml", module.domain));
        let xml = xml.to_string_lossy();
        self.run(module, &["define", &xml])?;
        self.run(module, &["autostart", "--disable", &module.domain])?;
        Ok(())
    }

    fn start(&self, module: &Module) -> Result<(), DriverError> {
        if self.state(module)? != VmState::Running {
            self.run(module, &["start", &module.domain])?;
        }
        if self.wait_for(module, START_TIMEOUT, |s| s == VmState::Running) {
            Ok(())
        } else {
            Err(DriverError::Timeout {
                what: format!("start of {}", module.domain),
                secs: START_TIMEOUT.as_secs(),
            })
        }
    }

    fn stop(&self, module: &Module) -> Result<(), DriverError> {
        if self.state(module)?.is_down() {
            return Ok(());
        }
        // A guest without ACPI handling ignores this; destroy follows.
        let _ = self.run(module, &["shutdown", &module.domain]);
        let timeout = Duration::from_secs(module.stop_timeout_s);
        if self.wait_for(module, timeout, VmState::is_down) {
            return Ok(());
        }
        self.run(module, &["destroy", &module.domain])?;
        if self.wait_for(module, Duration::from_secs(10), VmState::is_down) {
            Ok(())
        } else {
            Err(DriverError::Timeout {
                what: format!("destroy of {}", module.domain),
                secs: 10,
            })
        }
    }

    fn state(&self, module: &Module) -> Result<VmState, DriverError> {
        match self.run(module, &["domstate", &module.domain]) {
            Ok(text) => Ok(parse_domstate(&text)),
            Err(DriverError::Failed { detail, .. })
                if detail.contains("failed to get domain") || detail.contains("not found") =>
            {
                Ok(VmState::Missing)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domstate() {
        assert_eq!(parse_domstate("running\n"), VmState::Running);
        assert_eq!(parse_domstate("shut off"), VmState::ShutOff);
        assert_eq!(parse_domstate("crashed"), VmState::Crashed);
        assert_eq!(parse_domstate("paused"), VmState::Paused);
    }
}
