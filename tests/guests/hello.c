/* hello: prints a line on the serial console and powers off through ACPI. */
#include "guest.h"

void guest_main(struct hvm_start_info *si)
{
	if (si->magic != 0x336ec578)
		fail("bad hvm_start_info magic");
	puts("hello from kubevmm guest\n");
	puts("memmap entries: ");
	put_dec(si->memmap_entries);
	puts("\n");
}
