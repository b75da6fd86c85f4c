//! Machine basics on the real /dev/kvm: serial output, ACPI power-off, crash
//! reporting, bad input.

mod common;

use common::*;
use kubevmm_vmm::exit::code;

#[test]
fn hello_prints_and_powers_off_via_acpi() {
    let dir = scratch("hello");
    let out = run(&config("hello", &dir), &dir);
    assert!(out.serial.contains("hello from kubevmm guest"), "{out:?}");
    // The guest read our PVH memory map (3 entries: low RAM, BIOS area, high RAM).
    assert!(out.serial.contains("memmap entries: 3"), "{out:?}");
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
}

#[test]
fn hello_on_stdout() {
    let dir = scratch("stdout");
    let mut c = config("hello", &dir);
    c.serial = kubevmm_vmm::config::SerialConfig::default();
    let out = run(&c, &dir);
    assert!(out.stdout.contains("hello from kubevmm guest"), "{out:?}");
    assert_eq!(out.code, Some(code::POWER_OFF));
}

/// `--trace-boot` reports every start-up step once, in order, after the
/// guest's first output (which the report also names); without the flag
/// nothing is reported.
#[test]
fn trace_boot_reports_every_step_in_order() {
    use kubevmm_vmm::boot_trace::{parse_line, Step};
    let dir = scratch("trace-boot");
    let c = config("hello", &dir);
    let mut cmd = std::process::Command::new(vmm_bin());
    cmd.arg("--trace-boot");
    let out = wait(spawn_with(cmd, &c, &dir, "vm.json"), &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    let steps: Vec<(Step, u64)> = out.stderr.lines().filter_map(parse_line).collect();
    let names: Vec<Step> = steps.iter().map(|(s, _)| *s).collect();
    assert_eq!(names, Step::ALL, "{}", out.stderr);
    assert!(
        steps.windows(2).all(|w| w[0].1 <= w[1].1),
        "stamps go forward: {}",
        out.stderr
    );
    let plain = run(&config("hello", &dir), &dir);
    assert!(!plain.stderr.contains("boot-trace"), "{plain:?}");
}

#[test]
fn triple_fault_is_reported_as_crash() {
    let dir = scratch("triple");
    let mut c = config("crash", &dir);
    c.cmdline = "triple".into();
    let out = run(&c, &dir);
    assert!(out.serial.contains("crash guest running"), "{out:?}");
    assert_eq!(out.code, Some(code::GUEST_CRASH), "{out:?}");
    assert!(out.stderr.contains("triple fault"), "{out:?}");
}

#[test]
fn guest_panic_is_reported_as_crash() {
    let dir = scratch("panic");
    let mut c = config("crash", &dir);
    c.cmdline = "panic".into();
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::GUEST_CRASH), "{out:?}");
    assert!(out.stderr.contains("pvpanic"), "{out:?}");
}

fn expect_error(c: &kubevmm_vmm::VmConfig, dir: &std::path::Path, needle: &str) {
    let out = run(c, dir);
    assert_eq!(out.code, Some(code::VMM_ERROR), "{out:?}");
    assert!(
        out.stderr.contains(needle),
        "stderr lacks {needle:?}: {out:?}"
    );
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

#[test]
fn bad_input_is_named_in_the_error() {
    let dir = scratch("bad");
    let mut c = config("hello", &dir);
    c.kernel = dir.join("missing-vmlinux");
    expect_error(&c, &dir, "missing-vmlinux");

    let corrupt = dir.join("corrupt-kernel");
    std::fs::write(&corrupt, vec![0x42u8; 4096]).unwrap();
    let mut c = config("hello", &dir);
    c.kernel = corrupt;
    expect_error(&c, &dir, "corrupt-kernel");

    let mut c = config("hello", &dir);
    c.initrd = Some(dir.join("big-initrd"));
    let f = std::fs::File::create(dir.join("big-initrd")).unwrap();
    f.set_len(128 << 20).unwrap();
    expect_error(&c, &dir, "big-initrd");

    let mut c = config("hello", &dir);
    c.memory = 1 << 50;
    expect_error(&c, &dir, "more than this host has");

    let mut c = config("hello", &dir);
    c.disks.push(kubevmm_vmm::config::DiskConfig {
        id: "data".into(),
        path: dir.join("no-such-disk.img"),
        read_only: false,
        serial: None,
        fd: None,
        backing_fds: Vec::new(),
        format: None,
    });
    expect_error(&c, &dir, "no-such-disk.img");
}

#[test]
fn i8042_reset_exits_with_reboot_code() {
    let dir = scratch("reset");
    let out = run(&config("reset", &dir), &dir);
    assert!(out.serial.contains("reset guest booted"), "{out:?}");
    assert_eq!(out.code, Some(code::REBOOT), "{out:?}");
}

#[test]
fn i8042_reset_restarts_in_place_when_asked() {
    let dir = scratch("reset-restart");
    let mut c = config("reset", &dir);
    c.on_reboot = kubevmm_vmm::config::OnReboot::Restart;
    let mut child = spawn(&c, &dir);
    // The same VMM process booted the guest again: the appended serial log shows two boots.
    wait_for("a second boot", || {
        (serial_log(&dir).matches("reset guest booted").count() >= 2).then_some(())
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "VMM exited instead of restarting"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
