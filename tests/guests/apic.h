/* Local APIC, I/O APIC and interrupt descriptor helpers for the timer and
 * SMP guests. Addresses are the VMM's (docs/vmm.md): xAPIC at 0xfee00000,
 * I/O APIC at 0xfec00000, both inside the guests' 4 GiB identity map. */
#ifndef KUBEVMM_APIC_H
#define KUBEVMM_APIC_H
#include "guest.h"

#define LAPIC 0xfee00000ULL
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define IOAPIC 0xfec00000ULL

static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC + reg, v); }
static inline u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

static inline void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC, reg);
	mmio_write32(IOAPIC + 0x10, v);
}

/* For guests that sleep in HLT: the 8259s masked, the ACPI power button
 * enabled (PM1_EN), and the local APIC timer firing `vector` periodically
 * every `count` bus cycles (divide by 1 on KVM's 1 GHz APIC bus:
 * 10000000 = 100 Hz). The caller installs the IDT and enables interrupts. */
static inline void hlt_timer_start(u8 vector, u32 count)
{
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	outw(PM1_EN, 1u << 8);
	lapic_write(LAPIC_SVR, 0x100 | 0xff);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_TIMER_DIV, 0xb);
	lapic_write(LAPIC_LVT_TIMER, vector | (1u << 17));
	lapic_write(LAPIC_TIMER_INIT, count);
}

static inline u32 cpuid_apic_id(void)
{
	u32 a = 1, b, c = 0, d;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return b >> 24;
}
#endif
