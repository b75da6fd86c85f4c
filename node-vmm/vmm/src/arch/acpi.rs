//! ACPI tables: RSDP, XSDT, FADT (with a PM1 event/control block so guests
//! can power off and receive the power button), FACS, MADT and a DSDT that
//! describes the serial port, pvpanic and the virtio-mmio devices, so a stock
//! Linux kernel finds them without `virtio_mmio.device=`.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const OEM_ID: [u8; 6] = *b"KUBVMM";
const OEM_TABLE_ID: [u8; 8] = *b"KUBEVMM ";
const OEM_REVISION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the {max} reserved for them", max = layout::ACPI_END - layout::ACPI_START)]
    TooBig(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    pub addr: u64,
    pub irq: u32,
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio device node: `_HID` "LNRO0005", `_UID`, `_CRS`.
fn virtio_device_aml(index: usize, dev: &MmioDeviceInfo, sink: &mut Vec<u8>) {
    let name = format!("VR{index:02X}");
    let uid = index as u32;
    let mem = aml::Memory32Fixed::new(true, dev.addr as u32, layout::VIRTIO_MMIO_SIZE as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// The DSDT body (AML).
fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body: Vec<u8> = Vec::new();
    // \_S5: SLP_TYPa, SLP_TYPb for soft-off.
    let s5 = layout::S5_SLP_TYP;
    let s5_pkg = aml::Package::new(vec![&s5, &s5, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5_pkg).to_aml_bytes(&mut body);

    let com1_io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let com1_res = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_res);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let pvp_io = aml::IO::new(layout::PVPANIC_PORT, layout::PVPANIC_PORT, 1, 1);
    let pvp_res = aml::ResourceTemplate::new(vec![&pvp_io]);
    let pvp_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvp_crs = aml::Name::new("_CRS".into(), &pvp_res);
    let pvpanic = aml::Device::new("PEVT".into(), vec![&pvp_hid, &pvp_crs]);

    let mut virtio = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        virtio_device_aml(i, d, &mut virtio);
    }
    let virtio = RawAml(virtio);
    aml::Scope::new("\\_SB_".into(), vec![&com1, &pvpanic, &virtio]).to_aml_bytes(&mut body);
    body
}

/// Already-encoded AML, spliced into a parent object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn facs() -> Vec<u8> {
    let mut t = vec![0u8; 64];
    t[0..4].copy_from_slice(b"FACS");
    t[4..8].copy_from_slice(&64u32.to_le_bytes());
    t[32] = 2; // version
    t
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // The power button is the fixed-feature one (flag clear); no sleep button.
        .flag(Flags::Wbinvd)
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    f.dsdt = (dsdt_addr as u32).into();
    f.x_dsdt = dsdt_addr.into();
    f.firmware_ctrl = (facs_addr as u32).into();
    f.x_firmware_ctrl = facs_addr.into();
    f.sci_int = (layout::SCI_IRQ as u16).into();
    // SMI_CMD = 0: the platform is always in ACPI mode.
    f.pm1a_evt_blk = u32::from(layout::PM1_EVT_PORT).into();
    f.pm1_evt_len = 4;
    f.pm1a_cnt_blk = u32::from(layout::PM1_CNT_PORT).into();
    f.pm1_cnt_len = 2;
    f.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        u64::from(layout::PM1_EVT_PORT),
    );
    f.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        u64::from(layout::PM1_CNT_PORT),
    );
    // Reset through the i8042 (command 0xfe on port 0x64).
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::I8042_PORT + 4),
    );
    f.reset_value = 0xfe;
    // IA-PC boot architecture: 8042 present, no VGA, no CMOS RTC.
    f.iapc_boot_arch = ((1u16 << 1) | (1 << 2) | (1 << 5)).into();
    bytes_of(&f.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, layout::LAPIC_ADDR);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259 present
    for i in 0..cpus {
        // Processor local APIC: uid, APIC id, enabled.
        t.append_slice(&[0, 8, i, i, 1, 0, 0, 0]);
    }
    // I/O APIC id 0 at IOAPIC_ADDR, GSI base 0.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Interrupt source overrides: PIT IRQ0 -> GSI 2; SCI level, active high.
    t.append_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    let sci = layout::SCI_IRQ as u8;
    t.append_slice(&[2, 10, 0, sci, sci, 0, 0, 0, 0x0d, 0]);
    // Local APIC NMI on LINT1 for all processors.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn dsdt_table(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&dsdt(devices));
    t.update_checksum();
    t.as_slice().to_vec()
}

fn align(addr: u64, to: u64) -> u64 {
    addr.div_ceil(to) * to
}

/// Builds all tables into guest memory and returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let rsdp_addr = layout::ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64, 64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + bytes.len() as u64;
        if end > layout::ACPI_END {
            return Err(AcpiError::TooBig(end - layout::ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(at))?;
        next = align(end, 64);
        Ok(at)
    };
    let facs_addr = place(&facs())?;
    let dsdt_addr = place(&dsdt_table(devices))?;
    let fadt_addr = place(&fadt(dsdt_addr, facs_addr))?;
    let madt_addr = place(&madt(cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes_of(&xsdt))?;
    mem.write_slice(
        &bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(rsdp_addr),
    )?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let devs = [MmioDeviceInfo {
            addr: layout::VIRTIO_MMIO_BASE,
            irq: 16,
        }];
        for t in [fadt(0x1000, 0x2000), madt(2), dsdt_table(&devs)] {
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
            assert!(checksum_ok(&t));
        }
    }

    #[test]
    fn dsdt_names_virtio_mmio_devices() {
        let devs = [
            MmioDeviceInfo {
                addr: layout::VIRTIO_MMIO_BASE,
                irq: 16,
            },
            MmioDeviceInfo {
                addr: layout::VIRTIO_MMIO_BASE + 0x1000,
                irq: 17,
            },
        ];
        let d = dsdt_table(&devs);
        let count = d.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(d.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn fadt_points_at_pm1_blocks() {
        let f = fadt(0x1000, 0x2000);
        // PM1a_EVT_BLK at offset 56, PM1a_CNT_BLK at offset 64 (ACPI 6.5 table 5.9).
        assert_eq!(u32::from_le_bytes(f[56..60].try_into().unwrap()), 0x600);
        assert_eq!(u32::from_le_bytes(f[64..68].try_into().unwrap()), 0x604);
        assert_eq!(u16::from_le_bytes(f[46..48].try_into().unwrap()), 9);
    }
}
