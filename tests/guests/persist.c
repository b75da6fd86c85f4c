/* persist: counts its boots on every virtio-blk disk, to show that disk
 * data lives with the VM across stop/start and agent restarts.
 *   For each disk (in slot order): reads sector 64; if it holds the mark
 *   "KVMMBOOT" followed by a count, prints "disk <serial> boots <count>",
 *   else "disk <serial> boots 0"; writes the count + 1 back and flushes.
 * Then prints "persist done" and, with "hold" on the command line, idles
 * (the agent stops it), else powers off. */
#include "guest.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define F_FLUSH (1u << 9)
#define MARK_SECTOR 64

static u8 queue_area[3 * 4096] __attribute__((aligned(4096)));
static u8 data[512] __attribute__((aligned(512)));
static struct { u32 type; u32 reserved; u64 sector; } req;
static volatile u8 status;
static struct vq vq;

static u8 io(u64 base, u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
	req.type = type;
	req.reserved = 0;
	req.sector = sector;
	status = 0xff;
	vq.desc[0].addr = (u64)&req;
	vq.desc[0].len = sizeof(req);
	vq.desc[0].flags = VRING_DESC_F_NEXT;
	vq.desc[0].next = 1;
	vq.desc[1].addr = (u64)buf;
	vq.desc[1].len = len;
	vq.desc[1].flags = VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0);
	vq.desc[1].next = 2;
	vq.desc[2].addr = (u64)&status;
	vq.desc[2].len = 1;
	vq.desc[2].flags = VRING_DESC_F_WRITE;
	vq.desc[2].next = 0;
	if (!len) {
		/* No data: the status descriptor follows the header. */
		vq.desc[0].next = 2;
	}
	vq.avail->ring[vq.avail_idx % vq.size] = 0;
	barrier();
	vq.avail_idx++;
	vq.avail->idx = vq.avail_idx;
	virtio_notify(base, 0);
	vq_wait_used(&vq);
	return status;
}

static void count_boots(u64 base)
{
	static u8 id[24];
	u32 boots = 0;
	if (!(virtio_init(base, F_FLUSH) & F_FLUSH))
		fail("flush not offered");
	virtio_setup_queue(base, 0, &vq, queue_area, 16);
	virtio_driver_ok(base);
	memset(id, 0, sizeof(id));
	if (io(base, T_GET_ID, 0, id, 20, 1) != 0)
		fail("GET_ID failed");
	if (io(base, T_IN, MARK_SECTOR, data, sizeof(data), 1) != 0)
		fail("read failed");
	if (!memcmp(data, "KVMMBOOT", 8))
		memcpy(&boots, data + 8, sizeof(boots));
	puts("disk ");
	puts((const char *)id);
	puts(" boots ");
	put_dec(boots);
	puts("\n");
	boots++;
	memset(data, 0, sizeof(data));
	memcpy(data, "KVMMBOOT", 8);
	memcpy(data + 8, &boots, sizeof(boots));
	if (io(base, T_OUT, MARK_SECTOR, data, sizeof(data), 0) != 0)
		fail("write failed");
	if (io(base, T_FLUSH, 0, 0, 0, 0) != 0)
		fail("flush failed");
	/* Reset: the queue memory is used by the next disk. */
	mmio_write32(base + 0x70, 0);
}

void guest_main(struct hvm_start_info *si)
{
	int i, disks = 0;
	for (i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
		u64 b = VIRTIO_MMIO_BASE + (u64)i * VIRTIO_MMIO_STRIDE;
		if (mmio_read32(b) == 0x74726976 && mmio_read32(b + 8) == 2) {
			count_boots(b);
			disks++;
		}
	}
	if (!disks)
		fail("no virtio-blk device");
	puts("persist done\n");
	if (cmdline_has(si, "hold"))
		for (;;)
			__asm__ volatile("hlt");
}
