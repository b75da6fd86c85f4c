/* counter: prints "tick N" forever (pause/resume test) and powers off when
 * the ACPI power button is pressed (graceful shutdown test). Polls PM1_STS
 * so it needs no interrupt handling.
 */
#include "guest.h"

#define PWRBTN (1u << 8)

void guest_main(struct hvm_start_info *si)
{
	u64 tick = 0, spin;
	(void)si;
	outw(PM1_EN, PWRBTN);
	puts("counter running\n");
	for (;;) {
		puts("tick ");
		put_dec(tick++);
		puts("\n");
		for (spin = 0; spin < 20000; spin++) {
			if (inw(PM1_STS) & PWRBTN) {
				outw(PM1_STS, PWRBTN);
				puts("power button pressed, powering off\n");
				return;
			}
		}
	}
}
