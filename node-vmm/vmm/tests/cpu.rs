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
    assert!(
        out.serial
            .contains("timer: LAPIC timer ticks 20, PIT ticks 20, spurious 0"),
        "{out:?}"
    );
    assert!(out.serial.contains("timer: ok"), "{out:?}");
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
