/* crash: dies in the way the command line asks.
 *   triple  - an exception with an empty IDT: #UD -> #DF -> triple fault
 *   panic   - reports a guest panic on the pvpanic port
 */
#include "guest.h"

void guest_main(struct hvm_start_info *si)
{
	static const struct { u16 limit; u64 base; } __attribute__((packed)) empty_idt = { 0, 0 };
	puts("crash guest running\n");
	if (cmdline_has(si, "panic"))
		fail("guest panic requested");
	__asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
}
