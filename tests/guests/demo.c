/* demo: the guest `make demo` and `node-vmm run examples/demo-standalone.yaml`
 * boot. Prints a banner, reads the first sector of its disk, announces
 * itself on its NIC and answers ARP for 10.0.2.15 once, then powers off when
 * the ACPI power button is pressed ("wait" on the command line) or at once.
 */
#include "guest.h"
#include "net.h"

static u8 queue_area[3 * 4096] __attribute__((aligned(4096)));
static u8 sector[512];
static struct { u32 type; u32 reserved; u64 sector; } req;
static volatile u8 status;

static void read_disk(void)
{
	struct vq vq;
	u64 base = virtio_find(2);
	usize i;
	if (!base) {
		puts("demo: no disk\n");
		return;
	}
	virtio_init(base, 0);
	virtio_setup_queue(base, 0, &vq, queue_area, 8);
	virtio_driver_ok(base);
	req.type = 0;
	req.sector = 0;
	vq.desc[0].addr = (u64)&req; vq.desc[0].len = 16; vq.desc[0].flags = VRING_DESC_F_NEXT; vq.desc[0].next = 1;
	vq.desc[1].addr = (u64)sector; vq.desc[1].len = 512; vq.desc[1].flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE; vq.desc[1].next = 2;
	vq.desc[2].addr = (u64)&status; vq.desc[2].len = 1; vq.desc[2].flags = VRING_DESC_F_WRITE;
	vq.avail->ring[0] = 0;
	barrier();
	vq.avail->idx = 1;
	virtio_notify(base, 0);
	vq_wait_used(&vq);
	if (status)
		fail("disk read failed");
	for (i = 0; i < 80 && sector[i] >= ' ' && sector[i] < 127; i++)
		;
	sector[i] = 0;
	puts("demo: disk says: ");
	puts((const char *)sector);
	puts("\n");
}

void guest_main(struct hvm_start_info *si)
{
	static const u8 ip[4] = { 10, 0, 2, 15 };
	struct net n;
	puts("\n=== kubevmm demo guest ===\n");
	puts("demo: booted by the kubevmm VMM through PVH, cmdline: ");
	puts((const char *)si->cmdline_paddr);
	puts("\n");
	read_disk();
	if (net_init(&n)) {
		int i;
		puts("demo: NIC up, MAC");
		for (i = 0; i < 6; i++) {
			putc(i ? ':' : ' ');
			putc("0123456789abcdef"[n.mac[i] >> 4]);
			putc("0123456789abcdef"[n.mac[i] & 15]);
		}
		puts(", answering ARP for 10.0.2.15\n");
		if (cmdline_has(si, "arp")) {
			net_answer_arp(&n, ip);
			puts("demo: ARP answered\n");
		}
	} else {
		puts("demo: no NIC\n");
	}
	if (cmdline_has(si, "wait")) {
		outw(PM1_EN, 1 << 8);
		puts("demo: waiting for ACPI shutdown\n");
		while (!(inw(PM1_STS) & (1 << 8)))
			cpu_relax();
		puts("demo: ACPI shutdown requested\n");
	}
	puts("demo: powering off\n");
}
