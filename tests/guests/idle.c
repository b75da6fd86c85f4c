/* idle: a long-running guest that costs (almost) no host CPU, for the
 * cluster tests and benchmarks. Sleeps in HLT between 10 Hz local APIC timer
 * ticks, prints "heartbeat N" every second, and powers off when the ACPI
 * power button is pressed (PM1_STS is checked at every wake-up). */
#include "guest.h"
#include "apic.h"
#include "idt.h"

#define VEC_TICK 0x40
#define PWRBTN (1u << 8)

static volatile u64 ticks;

__attribute__((interrupt)) static void on_tick(struct interrupt_frame *f)
{
	(void)f;
	ticks++;
	lapic_write(LAPIC_EOI, 0);
}

void guest_main(struct hvm_start_info *si)
{
	u64 seen = 0;
	(void)si;
	idt_load_default();
	set_gate(VEC_TICK, on_tick);
	/* Only the local APIC timer wakes us. */
	hlt_timer_start(VEC_TICK, 100000000); /* 10 Hz */
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
