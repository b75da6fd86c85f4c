/* idle: a long-running guest that costs (almost) no host CPU, for the
 * cluster tests and benchmarks. Sleeps in HLT between 10 Hz local APIC timer
 * ticks, prints "heartbeat N" every second, and powers off when the ACPI
 * power button is pressed (PM1_STS is checked at every wake-up). */
#include "guest.h"
#include "apic.h"

#define VEC_TICK 0x40
#define PWRBTN (1u << 8)

struct idt_entry {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 attr;
	u16 off1;
	u32 off2;
	u32 zero;
};
struct interrupt_frame;

static struct idt_entry idt[256] __attribute__((aligned(16)));
static volatile u64 ticks;

__attribute__((interrupt)) static void on_tick(struct interrupt_frame *f)
{
	(void)f;
	ticks++;
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_spurious(struct interrupt_frame *f)
{
	(void)f;
}

__attribute__((interrupt)) static void on_other(struct interrupt_frame *f)
{
	(void)f;
	fail("unexpected exception or interrupt vector");
}

static void set_gate(int v, void (*h)(struct interrupt_frame *))
{
	u64 a = (u64)h;
	idt[v].off0 = (u16)a;
	idt[v].sel = 0x08;
	idt[v].ist = 0;
	idt[v].attr = 0x8e;
	idt[v].off1 = (u16)(a >> 16);
	idt[v].off2 = (u32)(a >> 32);
	idt[v].zero = 0;
}

void guest_main(struct hvm_start_info *si)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr;
	u64 seen = 0;
	int i;
	(void)si;
	for (i = 0; i < 256; i++)
		set_gate(i, on_other);
	set_gate(VEC_TICK, on_tick);
	set_gate(0xff, on_spurious);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr));
	/* Mask the 8259s: only the local APIC timer wakes us. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	outw(PM1_EN, PWRBTN);
	lapic_write(LAPIC_SVR, 0x100 | 0xff);
	lapic_write(LAPIC_TPR, 0);
	/* Divide by 1 on KVM's 1 GHz APIC bus: 100000000 counts = 10 Hz. */
	lapic_write(LAPIC_TIMER_DIV, 0xb);
	lapic_write(LAPIC_LVT_TIMER, VEC_TICK | (1u << 17));
	lapic_write(LAPIC_TIMER_INIT, 100000000);
	puts("idle guest running\n");
	__asm__ volatile("sti");
	for (;;) {
		__asm__ volatile("hlt");
		if (inw(PM1_STS) & PWRBTN) {
			outw(PM1_STS, PWRBTN);
			puts("power button pressed, powering off\n");
			__asm__ volatile("cli");
			return;
		}
		if (ticks / 10 != seen) {
			seen = ticks / 10;
			puts("heartbeat ");
			put_dec(seen);
			puts("\n");
		}
	}
}
