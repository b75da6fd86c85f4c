/* smp: two vCPUs. The VMM enters the BSP through PVH and leaves the AP
 * waiting for INIT/SIPI in the in-kernel local APIC, as firmware would.
 * The BSP copies a real-mode trampoline to 0x10000, sends INIT and two
 * start-up IPIs to APIC id 1; the AP goes real -> protected -> long mode on
 * the BSP's GDT and page tables, reports its APIC id, counts, and the BSP
 * checks the count before powering off. */
#include "guest.h"
#include "apic.h"

#define TRAMPOLINE 0x10000ULL
#define AP_COUNT 1000

extern const u8 trampoline_start[], trampoline_end[];
extern u8 stacks[];
volatile u64 ap_stack_top;
static volatile u32 ap_state; /* 1: in C, 2: done */
static volatile u32 ap_apic_id = 0xffff, ap_cpuid_id = 0xffff;
static volatile u64 ap_counter;

/* Real-mode trampoline, assembled here and copied to TRAMPOLINE (so
 * addresses inside it are TRAMPOLINE + offset). */
__asm__(
	"	.section .text.trampoline, \"ax\"\n"
	"	.globl trampoline_start, trampoline_end\n"
	"	.code16\n"
	"trampoline_start:\n"
	"	cli\n"
	"	movw %cs, %ax\n"
	"	movw %ax, %ds\n"
	"	lgdtl (tramp_gdtr - trampoline_start)\n"
	"	movl %cr0, %eax\n"
	"	orl $1, %eax\n"
	"	movl %eax, %cr0\n"
	"	ljmpl $0x18, $(0x10000 + tramp32 - trampoline_start)\n"
	"	.code32\n"
	"tramp32:\n"
	"	movw $0x10, %ax\n"
	"	movw %ax, %ds\n"
	"	movw %ax, %es\n"
	"	movw %ax, %ss\n"
	"	movl %cr4, %eax\n"
	"	orl $0x20, %eax\n"
	"	movl %eax, %cr4\n"
	"	movl $pml4, %eax\n"
	"	movl %eax, %cr3\n"
	"	movl $0xC0000080, %ecx\n"
	"	rdmsr\n"
	"	orl $0x100, %eax\n"
	"	wrmsr\n"
	"	movl %cr0, %eax\n"
	"	orl $0x80000001, %eax\n"
	"	movl %eax, %cr0\n"
	"	ljmp $0x08, $ap_long\n"
	"	.p2align 2\n"
	"tramp_gdtr:\n"
	"	.word 31\n"
	"	.long gdt\n"
	"trampoline_end:\n"
	"	.code64\n"
	"	.text\n"
	"ap_long:\n"
	"	movw $0x10, %ax\n"
	"	movw %ax, %ds\n"
	"	movw %ax, %es\n"
	"	movw %ax, %ss\n"
	"	movq ap_stack_top(%rip), %rsp\n"
	"	call ap_main\n"
	"1:	cli\n"
	"	hlt\n"
	"	jmp 1b\n");

void ap_main(void)
{
	u64 i;
	ap_apic_id = lapic_id();
	ap_cpuid_id = cpuid_apic_id();
	ap_state = 1;
	for (i = 0; i < AP_COUNT; i++)
		ap_counter++;
	barrier();
	ap_state = 2;
}

static void send_ipi(u32 dest, u32 icr)
{
	lapic_write(LAPIC_ICR_HI, dest << 24);
	lapic_write(LAPIC_ICR_LO, icr);
	u64 t0 = rdtsc();
	while (lapic_read(LAPIC_ICR_LO) & (1u << 12)) { /* delivery pending */
		if (rdtsc() - t0 > 20000000000ULL)
			fail("IPI stays pending");
		cpu_relax();
	}
}

void guest_main(struct hvm_start_info *si)
{
	u64 t0;
	(void)si;
	puts("smp: BSP up, APIC id ");
	put_dec(lapic_id());
	puts(", CPUID APIC id ");
	put_dec(cpuid_apic_id());
	puts("\n");
	memcpy((void *)TRAMPOLINE, trampoline_start, (usize)(trampoline_end - trampoline_start));
	/* The first 16 KiB of `stacks` belong to the AP; the BSP runs on the rest. */
	ap_stack_top = (u64)stacks + 4 * 4096;
	barrier();
	lapic_write(LAPIC_SVR, 0x100 | 0xff);
	send_ipi(1, 0x4500);                             /* INIT, level assert */
	send_ipi(1, 0x4600 | (u32)(TRAMPOLINE >> 12));   /* SIPI */
	send_ipi(1, 0x4600 | (u32)(TRAMPOLINE >> 12));   /* SIPI again, per the MP spec */
	/* Give up after ~10 s of TSC (a loop count would take minutes in the
	 * software emulator). */
	t0 = rdtsc();
	while (ap_state != 2) {
		if (rdtsc() - t0 > 20000000000ULL)
			fail("AP did not come up after INIT/SIPI");
		cpu_relax();
	}
	puts("smp: AP up, APIC id ");
	put_dec(ap_apic_id);
	puts(", CPUID APIC id ");
	put_dec(ap_cpuid_id);
	puts(", counted ");
	put_dec(ap_counter);
	puts("\n");
	if (ap_apic_id != 1 || ap_cpuid_id != 1)
		fail("AP reports the wrong APIC id");
	if (ap_counter != AP_COUNT)
		fail("AP count is wrong");
	puts("smp: both CPUs ran\n");
}
