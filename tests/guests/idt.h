/* A 64-bit IDT for guests that take interrupts: every vector starts at a
 * default handler; set_gate() installs others; idt_load() activates it. */
#ifndef IDT_H
#define IDT_H
#include "guest.h"

struct interrupt_frame;
typedef void (*irq_handler)(struct interrupt_frame *);

struct idt_entry {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 attr;
	u16 off1;
	u32 off2;
	u32 zero;
};

static struct idt_entry idt[256] __attribute__((aligned(16)));

static inline void set_gate(int v, irq_handler h)
{
	u64 a = (u64)h;
	idt[v].off0 = (u16)a;
	idt[v].sel = 0x08;
	idt[v].ist = 0;
	idt[v].attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
	idt[v].off1 = (u16)(a >> 16);
	idt[v].off2 = (u32)(a >> 32);
	idt[v].zero = 0;
}

/* Points every vector at `fallback`, then loads the IDT. */
static inline void idt_load(irq_handler fallback)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr;
	int i;
	for (i = 0; i < 256; i++)
		set_gate(i, fallback);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr));
}

/* Ignores the interrupt (the local APIC's spurious vector needs no EOI). */
__attribute__((interrupt, unused)) static void idt_ignore(struct interrupt_frame *f)
{
	(void)f;
}

/* Any vector a guest did not expect: an exception or a stray interrupt. */
__attribute__((interrupt, unused)) static void idt_unexpected(struct interrupt_frame *f)
{
	(void)f;
	fail("unexpected exception or interrupt vector");
}

/* The IDT with every vector at idt_unexpected and the spurious vector
 * 0xff ignored. */
static inline void idt_load_default(void)
{
	idt_load(idt_unexpected);
	set_gate(0xff, idt_ignore);
}
#endif
