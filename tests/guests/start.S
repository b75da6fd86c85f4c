/* Common entry for kubevmm test guests.
 *
 * The VMM enters through the PVH note in 32-bit protected mode with paging
 * off and %ebx pointing at the hvm_start_info structure (PVH boot protocol).
 * We switch to long mode using page tables built at assembly time (identity
 * map of the first 4 GiB with 2 MiB pages), so no loop runs in the slow
 * instruction emulator, then call guest_main(start_info).
 */
	.section .note.Xen, "a"
	.p2align 2
	.long 4                 /* name size */
	.long 4                 /* desc size */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start

	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	movl %ebx, %edi              /* start_info, first C argument later */
	lgdt gdt_ptr
	movl %cr4, %eax
	orl $0x20, %eax              /* PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx       /* EFER */
	rdmsr
	orl $0x100, %eax             /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax        /* PG | PE */
	movl %eax, %cr0
	ljmp $0x08, $long_entry

	.code64
long_entry:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	/* Per-CPU stack: the BSP uses the first one. */
	movabsq $stack_top, %rsp
	call guest_main
	call guest_poweroff
1:	hlt
	jmp 1b

	.section .data
	.p2align 4
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff     /* 0x10: data */
	.quad 0x00cf9a000000ffff     /* 0x18: 32-bit code */
gdt_end:
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	.p2align 12
	.globl pml4
pml4:
	.quad pdpt + 0x3
	.fill 511, 8, 0
pdpt:
	.quad pd0 + 0x3
	.quad pd0 + 0x1003
	.quad pd0 + 0x2003
	.quad pd0 + 0x3003
	.fill 508, 8, 0
pd0:
	.set addr, 0
	.rept 2048
	.quad addr + 0x83            /* present, writable, 2 MiB page */
	.set addr, addr + 0x200000
	.endr

	.section .bss
	.p2align 12
	.globl stacks
stacks:
	.skip 4096 * 8               /* 16 KiB per CPU, two CPUs */
	.globl stack_top
stack_top:
