//! Interrupts, timers and SMP start-up through KVM's in-kernel irqchip.

mod common;

use common::*;
use kubevmm_vmm::exit::code;

/// Both tick sources reach the guest: the local APIC timer, and the
/// in-kernel PIT through the I/O APIC pin the MADT names for IRQ0 (pin 2;
/// without the VMM's GSI routing it would stay silent).
#[test]
fn timer_ticks_arrive_from_lapic_timer_and_pit() {
    let dir = scratch("timer");
    let out = run(&config("timer", &dir), &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    // The guest waits until both sources ticked 20 times; on a loaded host
    // one of them can be a tick or two ahead when the other gets there (the
    // in-kernel PIT re-injects ticks it could not deliver in time). An
    // interrupt storm would show as far more.
    let counts = timer_counts(&out.serial).unwrap_or_else(|| panic!("no tick counts: {out:?}"));
    let (lapic, pit, spurious) = counts;
    assert!(
        (20..=25).contains(&lapic),
        "LAPIC timer ticks {lapic}: {out:?}"
    );
    assert!((20..=25).contains(&pit), "PIT ticks {pit}: {out:?}");
    assert_eq!(spurious, 0, "{out:?}");
    assert!(out.serial.contains("timer: ok"), "{out:?}");
}

/// `(lapic, pit, spurious)` from the timer guest's
/// "timer: LAPIC timer ticks N, PIT ticks M, spurious S, ..." line.
fn timer_counts(serial: &str) -> Option<(u32, u32, u32)> {
    let line = serial
        .lines()
        .find(|l| l.starts_with("timer: LAPIC timer ticks "))?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(str::parse::<u32>);
    Some((
        numbers.next()?.ok()?,
        numbers.next()?.ok()?,
        numbers.next()?.ok()?,
    ))
}

/// With two vCPUs the AP waits for INIT/SIPI; the BSP starts it through a
/// real-mode trampoline and both report their APIC ids.
#[test]
fn smp_bsp_starts_the_ap_and_both_run() {
    let dir = scratch("smp");
    let mut c = config("smp", &dir);
    c.cpus = 2;
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(
        out.serial
            .contains("smp: BSP up, APIC id 0, CPUID APIC id 0"),
        "{out:?}"
    );
    assert!(
        out.serial
            .contains("smp: AP up, APIC id 1, CPUID APIC id 1, counted 1000"),
        "{out:?}"
    );
    assert!(out.serial.contains("smp: both CPUs ran"), "{out:?}");
}

/// The same guest with one vCPU: nobody answers the SIPI and the guest
/// reports it, so the SMP test above cannot pass by accident.
#[test]
fn smp_guest_fails_without_a_second_vcpu() {
    let dir = scratch("smp1");
    let out = run(&config("smp", &dir), &dir);
    assert_eq!(out.code, Some(code::GUEST_CRASH), "{out:?}");
    assert!(out.serial.contains("FAIL: AP did not come up"), "{out:?}");
}
