/* echo: a console guest for the console tests and the demo. Prints
 * "echo guest ready", then answers every line it reads on its serial port
 * with "echo: <line>"; the line "poweroff" (or the ACPI power button) powers
 * it off. Sleeps in HLT between 100 Hz local APIC timer ticks and drains the
 * UART's receive register at each, so it costs (almost) no host CPU. Lines
 * longer than its buffer are cut, never overflow it.
 * "flood N" writes N KiB as fast as the UART takes them: 64-byte lines, each
 * an 8-digit line number, a space, 54 letters that depend on the number and
 * "\n" (raw bytes, no "\r"), 16 at a time as into a 16550's FIFO; then
 * "flood done <number of lines> lines". The reader checks every line
 * against the pattern, so the count completes the check; a CRC here cost
 * more guest time than the output itself. */
#include "guest.h"
#include "apic.h"
#include "idt.h"

#define VEC_TICK 0x40
#define PWRBTN (1u << 8)
#define LSR_DATA_READY 0x01
#define LINE_MAX 120

__attribute__((interrupt)) static void on_tick(struct interrupt_frame *f)
{
	(void)f;
	lapic_write(LAPIC_EOI, 0);
}

static char line[LINE_MAX + 1];
static usize len;

/* memcpy in one instruction. */
static inline void movsb(char *d, const char *s, usize n)
{
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

/* n bytes to a port in one instruction: the emulator loops, not the guest. */
static inline void outsb(u16 port, const char *p, usize n)
{
	__asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(port) : "memory");
}

/* 26 letters four times over: line n's letters start at (n + 9) % 26. */
static const char letters[] =
	"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz"
	"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz";

/* Line n of a flood (see the top of the file), made from line n - 1 in l:
 * the number counts up in place and the letters are one copy, since every
 * instruction costs ~1 µs in software KVM's emulator. */
static void next_flood_line(usize n, char *l)
{
	int i = 7;
	if (n == 0) {
		movsb(l, "00000000 ", 9);
		l[63] = '\n';
	} else {
		while (i >= 0 && l[i] == '9')
			l[i--] = '0';
		if (i >= 0)
			l[i]++;
	}
	movsb(l + 9, letters + (n + 9) % 26, 54);
}

static void flood(usize kib)
{
	char l[64];
	usize n;
	for (n = 0; n < kib * 16; n++) {
		next_flood_line(n, l);
		for (int i = 0; i < 64; i += 16) {
			while (!(inb(COM1 + 5) & 0x20))
				cpu_relax();
			outsb(COM1, l + i, 16);
		}
	}
	puts("flood done ");
	put_dec(n);
	puts(" lines\n");
}

/* The number after "flood ", or 0. */
static usize flood_kib(void)
{
	usize kib = 0;
	if (len <= 6 || memcmp(line, "flood ", 6))
		return 0;
	for (usize i = 6; i < len; i++) {
		if (line[i] < '0' || line[i] > '9')
			return 0;
		kib = kib * 10 + (usize)(line[i] - '0');
	}
	return kib;
}

/* One received byte; returns 1 when the guest should power off. */
static int take(u8 c)
{
	if (c == '\r' || c == '\n') {
		if (len == 0)
			return 0;
		line[len] = 0;
		if (len == 8 && !memcmp(line, "poweroff", 8)) {
			puts("powering off\n");
			return 1;
		}
		usize kib = flood_kib();
		if (kib) {
			flood(kib);
			len = 0;
			return 0;
		}
		puts("echo: ");
		puts(line);
		puts("\n");
		len = 0;
		return 0;
	}
	if (len < LINE_MAX)
		line[len++] = (char)c;
	return 0;
}

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	idt_load_default();
	set_gate(VEC_TICK, on_tick);
	hlt_timer_start(VEC_TICK, 10000000); /* 100 Hz */
	puts("echo guest ready\n");
	__asm__ volatile("sti");
	for (;;) {
		__asm__ volatile("hlt");
		if (inw(PM1_STS) & PWRBTN) {
			outw(PM1_STS, PWRBTN);
			puts("power button pressed, powering off\n");
			break;
		}
		/* At most a FIFO's worth per tick: the loop is bounded. */
		int off = 0;
		for (int i = 0; i < 64 && (inb(COM1 + 5) & LSR_DATA_READY); i++)
			if (take(inb(COM1)))
				off = 1;
		if (off)
			break;
	}
	__asm__ volatile("cli");
}
