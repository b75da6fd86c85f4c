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
 *   blkrand    BLKRAND_N 4 KiB reads at pseudo-random 4 KiB-aligned offsets
 *              across the disk (xorshift64, fixed seed: the same offsets
 *              every run, here and under QEMU), queue depth 1, timed with
 *              rdtsc; after blkread when both are given
 * Results are printed as "bench: <what> <numbers>" for the driver to parse;
 * blkread and blkrand both as "bench: <what> bytes N cycles N wait N first X",
 * where wait is the part of the cycles spent between a request's notify and
 * its used entry (the device's time, as the guest sees it). */
#include "guest.h"

#define IOLOOP_N 20000
#define CHUNK (1u << 20)
#define BLKRAND_N 4096
#define BLKRAND_LEN 4096u
#define BLKRAND_SEED 0x9e3779b97f4a7c15ULL

static u8 queue_area[3 * 4096] __attribute__((aligned(4096)));
static u8 buf[CHUNK] __attribute__((aligned(4096)));
static struct { u32 type; u32 reserved; u64 sector; } req;
static volatile u8 status;

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

static struct vq vq;
static u64 blk_base, capacity;
/* Cycles between notify and used, summed over the requests. */
static u64 blk_wait;

/* Sets the first disk up once: one queue whose chain is header, buf, status. */
static void blk_open(int qemu)
{
	if (blk_base)
		return;
	blk_base = qemu ? virtio_find_qemu(2) : virtio_find(2);
	if (!blk_base)
		fail("no disk");
	virtio_init(blk_base, 0);
	capacity = (u64)mmio_read32(blk_base + 0x100) | (u64)mmio_read32(blk_base + 0x104) << 32;
	virtio_setup_queue(blk_base, 0, &vq, queue_area, 8);
	virtio_driver_ok(blk_base);
	vq.desc[0].addr = (u64)&req; vq.desc[0].len = 16; vq.desc[0].flags = VRING_DESC_F_NEXT; vq.desc[0].next = 1;
	vq.desc[1].addr = (u64)buf; vq.desc[1].flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE; vq.desc[1].next = 2;
	vq.desc[2].addr = (u64)&status; vq.desc[2].len = 1; vq.desc[2].flags = VRING_DESC_F_WRITE;
}

/* Reads `len` bytes at `sector` into buf and waits for them. */
static void blk_read(u64 sector, u32 len)
{
	u64 t;
	vq.desc[1].len = len;
	req.type = 0;
	req.sector = sector;
	status = 0xff;
	vq.avail->ring[vq.avail_idx % vq.size] = 0;
	barrier();
	vq.avail_idx++;
	vq.avail->idx = vq.avail_idx;
	t = rdtsc();
	virtio_notify(blk_base, 0);
	vq_wait_used(&vq);
	blk_wait += rdtsc() - t;
	if (status)
		fail("disk read failed");
}

static void blk_report(const char *what, u64 bytes, u64 cycles)
{
	puts("bench: ");
	puts(what);
	puts(" bytes ");
	put_dec(bytes);
	puts(" cycles ");
	put_dec(cycles);
	puts(" wait ");
	put_dec(blk_wait);
	blk_wait = 0;
	puts(" first ");
	put_hex(*(u64 *)buf);
	puts("\n");
}

static void blkread(int qemu)
{
	u64 sector, t0, t1, bytes = 0;
	blk_open(qemu);
	t0 = rdtsc();
	for (sector = 0; sector + CHUNK / 512 <= capacity; sector += CHUNK / 512) {
		blk_read(sector, CHUNK);
		bytes += CHUNK;
	}
	t1 = rdtsc();
	blk_report("blkread", bytes, t1 - t0);
}

static void blkrand(int qemu)
{
	u64 x = BLKRAND_SEED, blocks, t0, t1;
	u32 i;
	blk_open(qemu);
	blocks = capacity / (BLKRAND_LEN / 512);
	if (!blocks)
		fail("disk smaller than one block");
	t0 = rdtsc();
	for (i = 0; i < BLKRAND_N; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		blk_read(x % blocks * (BLKRAND_LEN / 512), BLKRAND_LEN);
	}
	t1 = rdtsc();
	blk_report("blkrand", (u64)BLKRAND_N * BLKRAND_LEN, t1 - t0);
}

void guest_main(struct hvm_start_info *si)
{
	puts("bench: hello\n");
	if (cmdline_has(si, "ioloop"))
		ioloop();
	if (cmdline_has(si, "blkread"))
		blkread(cmdline_has(si, "qemu"));
	if (cmdline_has(si, "blkrand"))
		blkrand(cmdline_has(si, "qemu"));
	if (cmdline_has(si, "idle"))
		for (;;)
			__asm__ volatile("cli; hlt");
	outb(0xf4, 0); /* QEMU isa-debug-exit; nothing on our VMM */
}
