/* timer: interrupts through the in-kernel irqchip. Installs an IDT, masks
 * the 8259 PICs, then counts two tick sources at 100 Hz each: the local
 * APIC timer (periodic, vector 0x40) and the in-kernel PIT (channel 0, rate
 * generator) routed through I/O APIC pin 2 as the MADT's interrupt source
 * override (IRQ0 -> GSI 2) promises (vector 0x41). Reports both counts. */
#include "guest.h"
#include "apic.h"
#include "idt.h"

#define TICKS 20
#define VEC_LAPIC 0x40
#define VEC_PIT 0x41

static volatile u64 lapic_ticks, pit_ticks, spurious;

__attribute__((interrupt)) static void on_lapic(struct interrupt_frame *f)
{
	(void)f;
	lapic_ticks++;
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_pit(struct interrupt_frame *f)
{
	(void)f;
	pit_ticks++;
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_spurious(struct interrupt_frame *f)
{
	(void)f;
	spurious++;
}

__attribute__((interrupt)) static void on_other(struct interrupt_frame *f)
{
	(void)f;
	fail("unexpected exception or interrupt vector");
}

static void pic_mask_all(void)
{
	/* ICW1-4 with vectors 0x20/0x28, then mask every line. */
	outb(0x20, 0x11); outb(0xa0, 0x11);
	outb(0x21, 0x20); outb(0xa1, 0x28);
	outb(0x21, 0x04); outb(0xa1, 0x02);
	outb(0x21, 0x01); outb(0xa1, 0x01);
	outb(0x21, 0xff); outb(0xa1, 0xff);
}

void guest_main(struct hvm_start_info *si)
{
	u64 t0, t1;
	(void)si;
	idt_load(on_other);
	set_gate(VEC_LAPIC, on_lapic);
	set_gate(VEC_PIT, on_pit);
	set_gate(0xff, on_spurious);
	pic_mask_all();

	lapic_write(LAPIC_SVR, 0x100 | 0xff); /* software-enable, spurious 0xff */
	lapic_write(LAPIC_TPR, 0);
	/* PIT IRQ0 arrives on I/O APIC pin 2: fixed, edge, high, to APIC 0. */
	ioapic_write(0x10 + 2 * 2 + 1, 0);
	ioapic_write(0x10 + 2 * 2, VEC_PIT);
	/* PIT channel 0, lobyte/hibyte, mode 2: 1193182 Hz / 11932 = 100 Hz. */
	outb(0x43, 0x34);
	outb(0x40, 11932 & 0xff);
	outb(0x40, 11932 >> 8);
	/* LAPIC timer: divide by 1; KVM's APIC bus runs at 1 GHz: 100 Hz. */
	lapic_write(LAPIC_TIMER_DIV, 0xb);
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC | (1u << 17));
	lapic_write(LAPIC_TIMER_INIT, 10000000);
	puts("timer: LAPIC timer and PIT armed, waiting for ticks\n");

	t0 = rdtsc();
	__asm__ volatile("sti");
	while (lapic_ticks < TICKS || pit_ticks < TICKS) {
		__asm__ volatile("hlt");
		if (lapic_ticks > 50 * TICKS || pit_ticks > 50 * TICKS)
			break;
	}
	__asm__ volatile("cli");
	t1 = rdtsc();
	lapic_write(LAPIC_LVT_TIMER, 1u << 16); /* masked */
	ioapic_write(0x10 + 2 * 2, 1u << 16);

	puts("timer: LAPIC timer ticks ");
	put_dec(lapic_ticks);
	puts(", PIT ticks ");
	put_dec(pit_ticks);
	puts(", spurious ");
	put_dec(spurious);
	puts(", TSC cycles ");
	put_dec(t1 - t0);
	puts("\n");
	if (lapic_ticks < TICKS)
		fail("too few LAPIC timer interrupts");
	if (pit_ticks < TICKS)
		fail("too few PIT interrupts through I/O APIC pin 2");
	puts("timer: ok\n");
}
