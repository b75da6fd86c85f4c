/* bench: the guest `make bench` (hack/bench-vmm.sh) runs, here and under
 * QEMU. One mode per command-line word:
 *   (none)     print a line and power off; also writes QEMU's isa-debug-exit
 *              port 0xf4 (ignored by our VMM) so QEMU -M microvm, which has
 *              no PM1 block, exits too
 *   idle       print a line, then halt with interrupts off (memory figures)
 *   ioloop     time IOLOOP_N `out` to port 0x80 with rdtsc
 *   blkread    read the whole first virtio disk sequentially in 1 MiB
 *              requests (queue depth 1), timed with rdtsc ("qemu": find
 *              the disk where QEMU's microvm puts virtio-mmio)
 * Results are printed as "bench: <what> <numbers>" for the driver to parse. */
#include "guest.h"

#define IOLOOP_N 20000
#define CHUNK (1u << 20)

static u8 queue_area[3 * 4096] __attribute__((aligned(4096)));
static u8 buf[CHUNK] __attribute__((aligned(4096)));
static struct { u32 type; u32 reserved; u64 sector; } req;
static volatile u8 status;

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

static void ioloop(void)
{
	u64 t0, t1;
	u32 n = IOLOOP_N;
	t0 = rdtsc();
	__asm__ volatile("1: outb %%al, $0x80\n\tdec %0\n\tjnz 1b" : "+c"(n) : "a"(0) : "memory");
	t1 = rdtsc();
	puts("bench: ioloop ");
	put_dec(IOLOOP_N);
	puts(" cycles ");
	put_dec(t1 - t0);
	puts("\n");
}

/* QEMU's microvm puts its virtio-mmio slots elsewhere ("qemu" on the
 * command line, with virtio-mmio.force-legacy=false for version 2). */
static u64 qemu_virtio_find(u32 device_id)
{
	int i;
	for (i = 0; i < 32; i++) {
		u64 b = 0xfeb00000ULL + (u64)i * 0x200;
		if (mmio_read32(b) == 0x74726976 && mmio_read32(b + 8) == device_id)
			return b;
	}
	return 0;
}

static void blkread(int qemu)
{
	struct vq vq;
	u64 base = qemu ? qemu_virtio_find(2) : virtio_find(2), capacity, sector, t0, t1, bytes = 0;
	if (!base)
		fail("no disk");
	virtio_init(base, 0);
	capacity = (u64)mmio_read32(base + 0x100) | (u64)mmio_read32(base + 0x104) << 32;
	virtio_setup_queue(base, 0, &vq, queue_area, 8);
	virtio_driver_ok(base);
	vq.desc[0].addr = (u64)&req; vq.desc[0].len = 16; vq.desc[0].flags = VRING_DESC_F_NEXT; vq.desc[0].next = 1;
	vq.desc[1].addr = (u64)buf; vq.desc[1].len = CHUNK; vq.desc[1].flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE; vq.desc[1].next = 2;
	vq.desc[2].addr = (u64)&status; vq.desc[2].len = 1; vq.desc[2].flags = VRING_DESC_F_WRITE;
	t0 = rdtsc();
	for (sector = 0; sector + CHUNK / 512 <= capacity; sector += CHUNK / 512) {
		req.type = 0;
		req.sector = sector;
		status = 0xff;
		vq.avail->ring[vq.avail_idx % vq.size] = 0;
		barrier();
		vq.avail_idx++;
		vq.avail->idx = vq.avail_idx;
		virtio_notify(base, 0);
		vq_wait_used(&vq);
		if (status)
			fail("disk read failed");
		bytes += CHUNK;
	}
	t1 = rdtsc();
	puts("bench: blkread bytes ");
	put_dec(bytes);
	puts(" cycles ");
	put_dec(t1 - t0);
	puts(" first ");
	put_hex(*(u64 *)buf);
	puts("\n");
}

void guest_main(struct hvm_start_info *si)
{
	puts("bench: hello\n");
	if (cmdline_has(si, "ioloop"))
		ioloop();
	if (cmdline_has(si, "blkread"))
		blkread(cmdline_has(si, "qemu"));
	if (cmdline_has(si, "idle"))
		for (;;)
			__asm__ volatile("cli; hlt");
	outb(0xf4, 0); /* QEMU isa-debug-exit; nothing on our VMM */
}
