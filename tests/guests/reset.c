/* reset: reboots through the i8042 (command 0xfe on port 0x64). The boot
 * count printed first lets the restart-in-place test see two boots. */
#include "guest.h"

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	puts("reset guest booted\n");
	outb(0x64, 0xfe);
	fail("still running after i8042 reset");
}
