/* uartirq: console output both ways a UART driver writes it. First
 * interrupt-driven, as Linux's 8250 driver writes a tty: the THR-empty
 * interrupt enabled (IER bit 1), up to 16 bytes into the FIFO per
 * interrupt, HLT in between, IER cleared when all is sent. Then polled, as
 * consoles and boot loaders write: 16 bytes per LSR check. Prints
 * "uartirq: <n> interrupts for <m> bytes" after the first part and
 * "uartirq: polled <k> bytes" after the second, then waits for the ACPI
 * power button. Both parts send the same pattern: byte i is '\n' when
 * i % 64 == 63, else 'A' + i % 26. */
#include "guest.h"
#include "apic.h"
#include "idt.h"

#define VEC_UART 0x44
#define COM1_GSI 4
#define IRQ_BYTES 512
#define POLL_BYTES 4096
#define PWRBTN (1u << 8)

static volatile usize sent, irqs;

static char pattern(usize i)
{
	return i % 64 == 63 ? '\n' : (char)('A' + i % 26);
}

/* Up to a FIFO's worth of the interrupt-driven part. */
static void send_some(void)
{
	for (int k = 0; k < 16 && sent < IRQ_BYTES; k++)
		outb(COM1, (u8)pattern(sent++));
	if (sent == IRQ_BYTES)
		outb(COM1 + 1, 0);      /* IER: nothing left to send */
}

__attribute__((interrupt)) static void on_uart(struct interrupt_frame *f)
{
	(void)f;
	irqs++;
	/* IIR 0x02: THR empty (reading IIR acknowledges it). */
	if ((inb(COM1 + 2) & 0x0f) == 0x02)
		send_some();
	lapic_write(LAPIC_EOI, 0);
}

void guest_main(struct hvm_start_info *si)
{
	char chunk[16];
	(void)si;
	idt_load_default();
	set_gate(VEC_UART, on_uart);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_write(LAPIC_SVR, 0x100 | 0xff);
	lapic_write(LAPIC_TPR, 0);
	/* COM1's IRQ 4 on I/O APIC pin 4: fixed, edge, high, to APIC 0. */
	ioapic_write(0x10 + 2 * COM1_GSI + 1, 0);
	ioapic_write(0x10 + 2 * COM1_GSI, VEC_UART);
	outw(PM1_EN, PWRBTN);

	puts("uartirq: interrupt-driven\n");
	outb(COM1 + 1, 0x02);           /* IER: THR empty */
	send_some();                    /* the rest follows each interrupt */
	while (sent < IRQ_BYTES)
		__asm__ volatile("sti; hlt; cli");
	puts("uartirq: ");
	put_dec(irqs);
	puts(" interrupts for ");
	put_dec(sent);
	puts(" bytes\n");

	for (usize i = 0; i < POLL_BYTES; i += 16) {
		for (int k = 0; k < 16; k++)
			chunk[k] = pattern(i + (usize)k);
		const char *p = chunk;
		usize n = sizeof(chunk);
		while (!(inb(COM1 + 5) & 0x20))
			cpu_relax();
		__asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(COM1) : "memory");
	}
	puts("uartirq: polled ");
	put_dec(POLL_BYTES);
	puts(" bytes\n");

	for (;;) {
		if (inw(PM1_STS) & PWRBTN) {
			outw(PM1_STS, PWRBTN);
			puts("power button pressed, powering off\n");
			return;
		}
		cpu_relax();
	}
}
