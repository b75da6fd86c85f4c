//! GSI routing for the in-kernel irqchip, matching what the MADT promises.
//!
//! KVM's default table sends GSI 0 (where the in-kernel PIT raises IRQ0) to
//! I/O APIC pin 0, but our MADT carries the usual interrupt source override
//! IRQ0 -> GSI 2, so a guest that honours it (Linux, the `timer` test guest)
//! programs pin 2 and would never see the PIT. Like QEMU, we route GSI 0 to
//! PIC IRQ 0 and I/O APIC pin 2, every other legacy GSI to the same PIC line
//! and I/O APIC pin, and GSIs 16-23 (virtio) to I/O APIC pins only.

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
};
use kvm_ioctls::VmFd;

/// Pins of KVM's in-kernel I/O APIC.
pub const IOAPIC_PINS: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("cannot build the GSI routing table: {0:?}")]
    Table(vmm_sys_util::fam::Error),
    #[error("KVM refused the GSI routing table: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// One route: GSI, irqchip (`KVM_IRQCHIP_*`), pin on that chip.
pub type Route = (u32, u32, u32);

/// The routing table described in the module comment.
pub fn routes() -> Vec<Route> {
    let mut r = Vec::new();
    for gsi in 0..16 {
        if gsi == 2 {
            // The PICs' cascade line; nothing raises GSI 2.
            continue;
        }
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        r.push((gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => r.push((0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => r.push((gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    r
}

/// Installs `routes()` on the VM (after the irqchip exists, before irqfds).
pub fn set_routing(vm: &VmFd) -> Result<(), IrqError> {
    let routes = routes();
    let mut table = KvmIrqRouting::new(0).map_err(IrqError::Table)?;
    for (gsi, chip, pin) in routes {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        table.push(e).map_err(IrqError::Table)?;
    }
    vm.set_gsi_routing(&table).map_err(IrqError::Kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pit_irq0_reaches_ioapic_pin_2_as_the_madt_says() {
        let r = routes();
        assert!(r.contains(&(0, KVM_IRQCHIP_IOAPIC, 2)));
        assert!(r.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(!r.iter().any(|&(g, _, _)| g == 2));
        assert!(!r.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
    }

    #[test]
    fn serial_sci_and_virtio_lines_keep_their_pins() {
        let r = routes();
        // COM1 (IRQ 4) and the ACPI SCI (IRQ 9).
        assert!(r.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(r.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(r.contains(&(9, KVM_IRQCHIP_IOAPIC, 9)));
        assert!(r.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        for gsi in 16..24 {
            assert!(r.contains(&(gsi, KVM_IRQCHIP_IOAPIC, gsi)));
        }
        assert!(r.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
    }
}
