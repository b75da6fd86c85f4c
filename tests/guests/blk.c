/* blk: drives the first virtio-blk device by polling.
 *   - reads sectors 0..127 and prints their CRC32 (host compares)
 *   - writes a pattern at sector 200, flushes, reads it back
 *   - discards sectors 300..307 after writing them, reads back zeroes
 *   - when offered, WRITE_ZEROES: a pattern at sectors 320..327 zeroed in
 *     two halves (kept allocated, then unmapped) after a request with an
 *     unknown flag was refused without touching it; then two whole 64 KiB
 *     clusters at sector 1024 (zero clusters on qcow2), all read back as
 *     zeroes; prints "write-zeroes ok"
 *   - prints the device serial (GET_ID)
 * Command line: "ro" expects the disk to be read-only (writes fail);
 * "hold" spins after the flush instead of powering off (kill -9 test);
 * "regions" also prints the CRC32 of 64 KiB at 12 KiB past each of the
 * first REGIONS MiB (straddling 64 KiB qcow2 clusters: compressed,
 * allocated, unallocated ones, as the host laid them out).
 */
#include "guest.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_UNSUPP 2
#define F_RO (1u << 5)
#define F_FLUSH (1u << 9)
#define F_DISCARD (1u << 13)
#define F_WRITE_ZEROES (1u << 14)
#define WZ_UNMAP 1u
/* virtio_blk_config: max_write_zeroes_sectors, max_write_zeroes_seg. */
#define CFG_MAX_WZ_SECTORS (0x100 + 48)
#define CFG_MAX_WZ_SEG (0x100 + 52)
#define REGIONS 8

struct blk_req { u32 type; u32 reserved; u64 sector; };

static u8 queue_area[3 * 4096] __attribute__((aligned(4096)));
static u8 data[64 * 1024] __attribute__((aligned(4096)));
static struct blk_req req;
static volatile u8 status;
static struct vq vq;
static u64 base;

/* Submits one request; len 0 means no data descriptor. Returns status. */
static u8 blk_io(u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
	u16 n = 0;
	req.type = type;
	req.reserved = 0;
	req.sector = sector;
	status = 0xff;
	vq.desc[0].addr = (u64)&req;
	vq.desc[0].len = sizeof(req);
	vq.desc[0].flags = VRING_DESC_F_NEXT;
	vq.desc[0].next = 1;
	if (len) {
		vq.desc[1].addr = (u64)buf;
		vq.desc[1].len = len;
		vq.desc[1].flags = VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0);
		vq.desc[1].next = 2;
		n = 2;
	} else {
		vq.desc[0].next = 2;
		n = 2;
	}
	vq.desc[n].addr = (u64)&status;
	vq.desc[n].len = 1;
	vq.desc[n].flags = VRING_DESC_F_WRITE;
	vq.desc[n].next = 0;
	vq.avail->ring[vq.avail_idx % vq.size] = 0;
	barrier();
	vq.avail_idx++;
	vq.avail->idx = vq.avail_idx;
	virtio_notify(base, 0);
	vq_wait_used(&vq);
	return status;
}

static void fill(u8 *p, u32 len, u8 seed)
{
	u32 i;
	for (i = 0; i < len; i++)
		p[i] = (u8)(seed + i * 7);
}

/* WRITE_ZEROES of `count` sectors at `sector`; returns the status. */
static u8 write_zeroes(u64 sector, u32 count, u32 flags)
{
	static struct { u64 sector; u32 count; u32 flags; } seg;
	seg.sector = sector;
	seg.count = count;
	seg.flags = flags;
	return blk_io(T_WRITE_ZEROES, 0, &seg, sizeof(seg), 0);
}

/* Reads `len` bytes at `sector`; fails with `what` unless all are zero. */
static void expect_zeroes(u64 sector, u32 len, const char *what)
{
	u32 i;
	if (blk_io(T_IN, sector, data, len, 1) != 0)
		fail("read after write-zeroes failed");
	for (i = 0; i < len; i++)
		if (data[i])
			fail(what);
}

static void check_write_zeroes(void)
{
	u32 i;
	if (mmio_read32(base + CFG_MAX_WZ_SECTORS) < 256 || mmio_read32(base + CFG_MAX_WZ_SEG) < 1)
		fail("write-zeroes limits too small");
	fill(data, 4096, 2);
	if (blk_io(T_OUT, 320, data, 4096, 0) != 0)
		fail("write before write-zeroes failed");
	if (write_zeroes(320, 8, 2) != S_UNSUPP)
		fail("an unknown write-zeroes flag was not refused");
	memset(data, 0, 4096);
	if (blk_io(T_IN, 320, data, 4096, 1) != 0)
		fail("read after a refused write-zeroes failed");
	for (i = 0; i < 4096; i++)
		if (data[i] != (u8)(2 + i * 7))
			fail("a refused write-zeroes changed the disk");
	if (write_zeroes(320, 4, 0) != 0 || write_zeroes(324, 4, WZ_UNMAP) != 0)
		fail("write-zeroes failed");
	expect_zeroes(320, 4096, "zeroed sectors are not zero");
	fill(data, sizeof(data), 3);
	if (blk_io(T_OUT, 1024, data, sizeof(data), 0) != 0 ||
	    blk_io(T_OUT, 1152, data, sizeof(data), 0) != 0)
		fail("write before cluster write-zeroes failed");
	if (write_zeroes(1024, 128, 0) != 0 || write_zeroes(1152, 128, WZ_UNMAP) != 0)
		fail("cluster write-zeroes failed");
	expect_zeroes(1024, sizeof(data), "zeroed cluster is not zero");
	expect_zeroes(1152, sizeof(data), "unmapped zeroed cluster is not zero");
	puts("write-zeroes ok\n");
}

void guest_main(struct hvm_start_info *si)
{
	u32 feat, crc, i;
	int ro = cmdline_has(si, "ro");
	struct { u64 sector; u32 count; u32 flags; } discard;

	base = virtio_find(2);
	if (!base)
		fail("no virtio-blk device");
	feat = virtio_init(base, F_RO | F_FLUSH | F_DISCARD | F_WRITE_ZEROES);
	virtio_setup_queue(base, 0, &vq, queue_area, 16);
	virtio_driver_ok(base);
	puts("virtio-blk ready, capacity ");
	put_dec(*(volatile u32 *)(base + 0x100));
	puts(" sectors\n");
	if (!(feat & F_FLUSH))
		fail("flush not offered");
	if (ro != !!(feat & F_RO))
		fail("read-only feature does not match the configuration");

	if (blk_io(T_IN, 0, data, sizeof(data), 1) != 0)
		fail("read failed");
	crc = crc32(data, sizeof(data), 0);
	puts("disk crc32 ");
	put_hex(crc);
	puts("\n");

	if (cmdline_has(si, "regions")) {
		for (i = 0; i < REGIONS; i++) {
			if (blk_io(T_IN, ((u64)i << 11) + 24, data, sizeof(data), 1) != 0)
				fail("region read failed");
			puts("region ");
			put_dec(i);
			puts(" crc32 ");
			put_hex(crc32(data, sizeof(data), 0));
			puts("\n");
		}
	}

	memset(data, 0, 32);
	if (blk_io(T_GET_ID, 0, data, 20, 1) != 0)
		fail("GET_ID failed");
	data[20] = 0;
	puts("disk serial ");
	puts((const char *)data);
	puts("\n");

	fill(data, 4096, 0x5a);
	if (ro) {
		if (blk_io(T_OUT, 200, data, 4096, 0) == 0)
			fail("write to a read-only disk succeeded");
		puts("read-only write refused\n");
		return;
	}
	if (blk_io(T_OUT, 200, data, 4096, 0) != 0)
		fail("write failed");
	if (blk_io(T_FLUSH, 0, 0, 0, 0) != 0)
		fail("flush failed");
	puts("flushed\n");
	if (cmdline_has(si, "hold"))
		for (;;)
			cpu_relax();
	memset(data, 0, 4096);
	if (blk_io(T_IN, 200, data, 4096, 1) != 0)
		fail("read-back failed");
	for (i = 0; i < 4096; i++)
		if (data[i] != (u8)(0x5a + i * 7))
			fail("read-back mismatch");
	puts("read-back ok\n");

	if (feat & F_DISCARD) {
		fill(data, 4096, 1);
		if (blk_io(T_OUT, 300, data, 4096, 0) != 0)
			fail("write before discard failed");
		discard.sector = 300;
		discard.count = 8;
		discard.flags = 0;
		if (blk_io(T_DISCARD, 0, &discard, sizeof(discard), 0) != 0)
			fail("discard failed");
		if (blk_io(T_IN, 300, data, 4096, 1) != 0)
			fail("read after discard failed");
		for (i = 0; i < 4096; i++)
			if (data[i])
				fail("discarded sectors are not zero");
		puts("discard ok\n");
	}
	if (feat & F_WRITE_ZEROES)
		check_write_zeroes();
	puts("blk test passed\n");
}
