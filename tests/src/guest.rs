//! The tiny test guest: the distribution's cloud kernel and a busybox-static
//! initramfs whose init writes an increasing counter to its disk.
//!
//! The init loads virtio_ring, virtio, virtio_pci_legacy_dev,
//! virtio_pci_modern_dev, virtio_pci, virtio_blk (in that order), then evdev
//! and the ACPI `button` module for busybox `acpid`, so `virsh shutdown`
//! powers the guest off at once. It reads the last counter from sector 0 of
//! `/dev/vda`, prints `VMHA-BOOT <n>`, then forever: n+1 written to sector 0
//! with O_DIRECT and fsync (busybox `dd oflag=direct conv=fsync`), and only
//! after that returned, `COUNTER <n>` on the serial console. The console log
//! is therefore the record of what the disk acknowledged.
//!
//! [`build_guest`] caches the kernel + initramfs under
//! `/var/tmp/vmha-guest-cache/<kernel version>-<hash>/`, the hash covering the
//! init script, the module list and the busybox binary.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::node::run;

/// Where built guests are cached.
pub const CACHE_DIR: &str = "/var/tmp/vmha-guest-cache";

/// Modules in load order (relative to nothing: found through modules.dep).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "evdev",
    "button",
];

/// The guest's /init. `vmha.interval=<seconds>` on the kernel command line sets
/// the pause between counters (default 0.2).
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo 1 > /proc/sys/kernel/printk
for m in __MODULES__; do
    insmod /lib/modules/$m.ko || echo "VMHA-ERROR insmod $m"
done
interval=0.2
for a in $(cat /proc/cmdline); do
    case "$a" in vmha.interval=*) interval=${a#vmha.interval=};; esac
done
acpid -c /etc/acpi -l /tmp/acpid.log || echo "VMHA-ERROR acpid"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || { echo "VMHA-ERROR no /dev/vda"; poweroff -f; }
n=0
last=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -n 1)
case "$last" in "VMHA-COUNTER "*) n=${last#VMHA-COUNTER }; n=${n%% *};; esac
case "$n" in ''|*[!0-9]*) n=0;; esac
echo "VMHA-BOOT $n"
while :; do
    n=$((n+1))
    if printf 'VMHA-COUNTER %d \n' "$n" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync,notrunc oflag=direct 2>/tmp/dd.err; then
        echo "COUNTER $n"
    else
        echo "VMHA-ERROR write $n: $(cat /tmp/dd.err)"
        n=$((n-1))
        sleep 1
    fi
    sleep "$interval"
done
"#;

/// busybox acpid runs `/etc/acpi/PWRF/00000080` on a power-button press.
pub const POWER_HANDLER: &str = "#!/bin/sh\necho VMHA-POWEROFF > /dev/console\npoweroff -f\n";

/// A built guest: kernel and initramfs paths.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The cloud kernel's version (`uname -r` in the guest).
    pub kernel_version: String,
    /// The kernel (a copy of /boot/vmlinuz-<version>).
    pub kernel: PathBuf,
    /// The initramfs (cpio, gzip).
    pub initrd: PathBuf,
}

/// Compares kernel versions numerically piece by piece ("6.1.0-56" > "6.1.0-9").
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The newest installed Debian cloud kernel that has its modules.
pub fn find_cloud_kernel() -> Result<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/boot").context("reading /boot")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            if v.ends_with("-cloud-amd64") && Path::new("/lib/modules").join(v).is_dir() {
                found.push(v.to_string());
            }
        }
    }
    found.sort_by_key(|v| version_key(v));
    found.pop().ok_or_else(|| {
        anyhow!("no /boot/vmlinuz-*-cloud-amd64 with modules: run .ci/install-deps (linux-image-cloud-amd64)")
    })
}

/// Path (under /lib/modules/<kver>) of module `name`, possibly compressed.
fn module_path(kver: &str, name: &str) -> Result<PathBuf> {
    let base = Path::new("/lib/modules").join(kver);
    let dep = fs::read_to_string(base.join("modules.dep"))
        .with_context(|| format!("reading modules.dep of {kver}"))?;
    for line in dep.lines() {
        let Some((file, _)) = line.split_once(':') else {
            continue;
        };
        let fname = file.rsplit('/').next().unwrap_or(file);
        let stem = fname
            .strip_suffix(".ko")
            .or_else(|| fname.strip_suffix(".ko.xz"))
            .or_else(|| fname.strip_suffix(".ko.zst"))
            .or_else(|| fname.strip_suffix(".ko.gz"));
        // modules.dep spells names with '-' or '_' as the file does; match both.
        if stem.is_some_and(|s| s.replace('-', "_") == name) {
            return Ok(base.join(file));
        }
    }
    bail!(
        "module {name} not in {}/modules.dep (built in?)",
        base.display()
    )
}

/// Copies module `src` to `dst` (an uncompressed .ko), decompressing if needed.
fn copy_module(src: &Path, dst: &Path) -> Result<()> {
    let s = src.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else if s.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
        }
        Some(tool) => {
            let out = run(Command::new(tool).arg("-dc").arg(src))?;
            fs::write(dst, out.stdout).with_context(|| format!("writing {}", dst.display()))?;
        }
    }
    Ok(())
}

fn init_script() -> String {
    INIT_SCRIPT.replace("__MODULES__", &MODULES.join(" "))
}

fn cache_key(kver: &str) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(init_script().as_bytes());
    h.update(POWER_HANDLER.as_bytes());
    h.update(MODULES.join(",").as_bytes());
    h.update(&fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?);
    Ok(format!("{kver}-{}", &h.finalize().to_hex()[..16]))
}

/// Builds the guest (or returns the cached one) for the newest cloud kernel.
pub fn build_guest() -> Result<GuestImage> {
    let kver = find_cloud_kernel()?;
    let cache = Path::new(CACHE_DIR);
    let dir = cache.join(cache_key(&kver)?);
    let image = GuestImage {
        kernel_version: kver.clone(),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.gz"),
    };
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {CACHE_DIR}"))?;
    // Build in a private directory, then rename: concurrent builders never see
    // a half-written guest.
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(cache)
        .context("creating a build directory")?;
    let out = tmp.path().join("out");
    let root = tmp.path().join("root");
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib/modules",
        "etc/acpi/PWRF",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::create_dir_all(&out)?;
    fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying busybox")?;
    for m in MODULES {
        copy_module(
            &module_path(&kver, m)?,
            &root.join(format!("lib/modules/{m}.ko")),
        )?;
    }
    write_exec(&root.join("init"), &init_script())?;
    write_exec(&root.join("etc/acpi/PWRF/00000080"), POWER_HANDLER)?;
    fs::copy(format!("/boot/vmlinuz-{kver}"), out.join("vmlinuz"))
        .with_context(|| format!("copying /boot/vmlinuz-{kver}"))?;
    let initrd = fs::File::create(out.join("initrd.gz"))?;
    // find | cpio -o -H newc | gzip, from the staging root.
    let script = "find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9";
    let st = Command::new("sh")
        .args(["-c", script])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(initrd)
        .status()
        .context("running cpio | gzip")?;
    if !st.success() {
        bail!("building the initramfs failed ({st})");
    }
    match fs::rename(&out, &dir) {
        Ok(()) => {}
        // Another builder won the race: use theirs.
        Err(_) if image.kernel.is_file() && image.initrd.is_file() => {}
        Err(e) => return Err(e).with_context(|| format!("renaming into {}", dir.display())),
    }
    Ok(image)
}

fn write_exec(path: &Path, content: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// What [`domain_xml`] needs.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// Domain name.
    pub name: String,
    /// The qcow2 disk.
    pub disk: PathBuf,
    /// Where the serial console is logged (appended across starts).
    pub console_log: PathBuf,
    /// RAM in MiB (128–256 is plenty).
    pub memory_mib: u32,
    /// Pause between counters in milliseconds.
    pub interval_ms: u32,
    /// qemu disk `io` mode: "native" or "threads".
    pub io: String,
}

impl DomainSpec {
    /// Defaults: 192 MiB, 200 ms between counters, io='native'.
    pub fn new(name: &str, disk: impl Into<PathBuf>, console_log: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            disk: disk.into(),
            console_log: console_log.into(),
            memory_mib: 192,
            interval_ms: 200,
            io: "native".to_string(),
        }
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The host's TSC frequency in kHz, measured once against the monotonic clock
/// (median of three 20 ms windows), on x86_64.
///
/// Why: under TCG the guest's TSC is the host's, and a guest kernel left to
/// calibrate it against the emulated PIT/HPET on a loaded host can get it
/// wrong by a large factor ("Fast TSC calibration failed", "Unable to
/// calibrate against PIT"); a refinement more than 1 % away is rejected, so
/// the error stays: the guest's clock then runs many times too fast (its
/// counters without their pause) or too slow (a boot that does not finish in
/// minutes). `tsc_early_khz=` gives the guest the frequency instead.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let window = std::time::Duration::from_millis(20);
            let mut samples: Vec<u64> = (0..3)
                .filter_map(|_| {
                    let t0 = std::time::Instant::now();
                    // SAFETY: RDTSC reads a counter; it has no memory effects
                    // and every x86_64 CPU has it.
                    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
                    while t0.elapsed() < window {}
                    // SAFETY: as above.
                    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
                    let us = u64::try_from(t0.elapsed().as_micros()).ok()?;
                    (us > 0).then(|| c1.wrapping_sub(c0) * 1000 / us)
                })
                .collect();
            samples.sort_unstable();
            samples.get(1).copied().filter(|&khz| khz > 100_000)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// The libvirt domain XML: `type='qemu'` (TCG), direct kernel boot, one virtio
/// qcow2 disk with `cache='none'`, serial console to a file, no network. The
/// guest is told the TSC frequency ([`host_tsc_khz`]).
pub fn domain_xml(image: &GuestImage, spec: &DomainSpec) -> String {
    let interval = format!("{}.{:03}", spec.interval_ms / 1000, spec.interval_ms % 1000);
    let tsc = host_tsc_khz()
        .map(|khz| format!(" tsc_early_khz={khz}"))
        .unwrap_or_default();
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vmha.interval={interval}{tsc}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='{io}'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{log}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        name = xml_escape(&spec.name),
        mem = spec.memory_mib,
        kernel = xml_escape(&image.kernel.to_string_lossy()),
        initrd = xml_escape(&image.initrd.to_string_lossy()),
        io = xml_escape(&spec.io),
        disk = xml_escape(&spec.disk.to_string_lossy()),
        log = xml_escape(&spec.console_log.to_string_lossy()),
    )
}

/// Creates a qcow2 image of `size_mib` MiB at `path` (qemu-img).
pub fn create_disk(path: &Path, size_mib: u64) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{size_mib}M")))?;
    Ok(())
}

/// The counter stored on a guest disk (sector 0), read with `qemu-io -r -U`
/// (works while a guest runs). `None` if the guest never wrote one.
pub fn read_disk_counter(qcow2: &Path) -> Result<Option<u64>> {
    let out = run(Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -v 0 64"])
        .arg(qcow2))?;
    let mut bytes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((off, rest)) = line.split_once(':') else {
            continue;
        };
        if off.len() != 8 || !off.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        for tok in rest.split_whitespace().take(16) {
            match u8::from_str_radix(tok, 16) {
                Ok(b) if tok.len() == 2 => bytes.push(b),
                _ => break,
            }
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("VMHA-COUNTER "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok()))
}

/// What the guest printed on its console.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Console {
    /// Every `COUNTER n`, in order.
    pub counters: Vec<u64>,
    /// Every `VMHA-BOOT n` (the counter read from disk at each boot), in order.
    pub boots: Vec<u64>,
    /// For each boot, how many counters were printed before its line: a
    /// guest killed while the test reads its console may print one more
    /// counter first, so the boot's first counter is found from here.
    pub boot_at: Vec<usize>,
    /// Number of `VMHA-POWEROFF` lines (ACPI power button handled).
    pub poweroffs: usize,
    /// `VMHA-ERROR ...` lines.
    pub errors: Vec<String>,
}

impl Console {
    /// Parses console text (CRLF, kernel messages and partial lines tolerated).
    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for line in text.lines() {
            let line = line.trim_matches(|ch: char| ch == '\r' || ch.is_whitespace());
            if let Some(n) = line.strip_prefix("COUNTER ").and_then(|n| n.parse().ok()) {
                c.counters.push(n);
            } else if let Some(n) = line.strip_prefix("VMHA-BOOT ").and_then(|n| n.parse().ok()) {
                c.boots.push(n);
                c.boot_at.push(c.counters.len());
            } else if line == "VMHA-POWEROFF" {
                c.poweroffs += 1;
            } else if line.starts_with("VMHA-ERROR") {
                c.errors.push(line.to_string());
            }
        }
        c
    }

    /// Reads and parses a console log file (a missing file is an empty console).
    pub fn read(path: &Path) -> Result<Self> {
        match fs::read(path) {
            Ok(b) => Ok(Self::parse(&String::from_utf8_lossy(&b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The first counter printed after boot `i` (where it resumed), once
    /// printed.
    pub fn first_after_boot(&self, i: usize) -> Option<u64> {
        self.counters.get(*self.boot_at.get(i)?).copied()
    }

    /// The last acknowledged counter.
    pub fn last_counter(&self) -> Option<u64> {
        self.counters.last().copied()
    }

    /// Fails unless the counters never go back: each one is greater than the
    /// one before, across reboots too (a boot resumes from the disk, which holds
    /// at least the last printed counter).
    pub fn check_monotonic(&self) -> Result<()> {
        for w in self.counters.windows(2) {
            if w[1] <= w[0] {
                bail!("counter went back: {} after {}", w[1], w[0]);
            }
        }
        Ok(())
    }
}

/// Waits until `pred` holds for the console at `path`, polling every 100 ms;
/// fails after `timeout` with the console's tail.
pub fn wait_console(
    path: &Path,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&Console) -> bool,
) -> Result<Console> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = Console::read(path)?;
        if pred(&c) {
            return Ok(c);
        }
        if Instant::now() >= deadline {
            let text = fs::read_to_string(path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            bail!(
                "timed out after {timeout:?} waiting for {what}; console {} tail:\n{}",
                path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_tsc_frequency_is_measured_plausibly() {
        if let Some(khz) = host_tsc_khz() {
            // Between 100 MHz and 10 GHz, and the same on a second look.
            assert!((100_000..10_000_000).contains(&khz), "{khz}");
            assert_eq!(host_tsc_khz(), Some(khz));
        }
    }

    #[test]
    fn a_boot_resumes_at_the_counter_printed_after_its_line() {
        // The guest printed COUNTER 5 after the test read its console and
        // before it was killed: the second boot's first counter is 6, not 5.
        let c = Console::parse("VMHA-BOOT 3\nCOUNTER 4\nCOUNTER 5\nVMHA-BOOT 5\n");
        assert_eq!(c.boot_at, [0, 2]);
        assert_eq!(c.first_after_boot(0), Some(4));
        assert_eq!(c.first_after_boot(1), None);
        let c = Console::parse("VMHA-BOOT 3\nCOUNTER 4\nCOUNTER 5\nVMHA-BOOT 5\nCOUNTER 6\n");
        assert_eq!(c.first_after_boot(1), Some(6));
        assert_eq!(c.first_after_boot(2), None);
    }

    #[test]
    fn parses_console() {
        let c = Console::parse(
            "[ 1.0] x\r\nVMHA-BOOT 7\r\nCOUNTER 8\r\nCOUNTER 9\r\nVMHA-POWEROFF\r\nCOUNT",
        );
        assert_eq!(c.boots, vec![7]);
        assert_eq!(c.counters, vec![8, 9]);
        assert_eq!(c.poweroffs, 1);
        assert!(c.check_monotonic().is_ok());
        assert!(Console::parse("COUNTER 3\nCOUNTER 3\n")
            .check_monotonic()
            .is_err());
    }

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key("6.1.0-56-cloud-amd64") > version_key("6.1.0-9-cloud-amd64"));
    }

    #[test]
    fn xml_has_the_essentials() {
        let img = GuestImage {
            kernel_version: "k".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let x = domain_xml(&img, &DomainSpec::new("vm1", "/d.qcow2", "/c.log"));
        for s in [
            "type='qemu'",
            "cache='none'",
            "<kernel>/k</kernel>",
            "vmha.interval=0.200",
        ] {
            assert!(x.contains(s), "{s} missing in {x}");
        }
    }
}
