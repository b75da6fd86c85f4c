/* hostile: attacks its own VMM through virtio with the lengths and protocol
 * violations a VMM must bound (DESIGN.md, "Security model": a guest can harm
 * only itself). The test checks that the VMM's memory stays small, that it
 * logs little, and that a VM beside it runs on.
 *   1. a TX descriptor of ~4 GiB, one past the end of RAM, a device-writable one
 *   2. an rng request of 256 buffers of 64 KiB (16 MiB) in one indirect table
 *   3. 2000 activations with a queue outside RAM (each one log-worthy)
 * Then prints "hostile done" and spins until the VMM is stopped.
 */
#include "guest.h"

#define VRING_DESC_F_INDIRECT 4
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_DESC_LO 0x080
#define VM_QUEUE_DESC_HI 0x084
#define VM_QUEUE_AVAIL_LO 0x090
#define VM_QUEUE_AVAIL_HI 0x094
#define VM_QUEUE_USED_LO 0x0a0
#define VM_QUEUE_USED_HI 0x0a4

static u8 rxq_area[3 * 4096] __attribute__((aligned(4096)));
static u8 txq_area[3 * 4096] __attribute__((aligned(4096)));
static u8 rngq_area[3 * 4096] __attribute__((aligned(4096)));
static u8 buf[64 * 1024] __attribute__((aligned(4096)));
static struct vring_desc table[256] __attribute__((aligned(16)));

/* Makes descriptor head available on queue q and waits for it to be used. */
static u32 post_wait(u64 base, u32 q, struct vq *vq, u16 head)
{
	vq->avail->ring[vq->avail_idx % vq->size] = head;
	barrier();
	vq->avail_idx++;
	vq->avail->idx = vq->avail_idx;
	virtio_notify(base, q);
	return vq_wait_used(vq);
}

static void tx_one(u64 net, struct vq *tx, u16 i, u64 addr, u32 len, u16 flags)
{
	tx->desc[i].addr = addr;
	tx->desc[i].len = len;
	tx->desc[i].flags = flags;
	tx->desc[i].next = 0;
	post_wait(net, 1, tx, i);
}

void guest_main(struct hvm_start_info *si)
{
	struct vq rx, tx, rq;
	u64 net = virtio_find(1), rng = virtio_find(4);
	u64 nowhere = 0x100ull << 32; /* 1 TiB: far past this guest's RAM */
	u32 got, i;
	(void)si;
	if (!net || !rng)
		fail("the hostile guest needs a NIC and an rng");

	virtio_init(net, 0);
	virtio_setup_queue(net, 0, &rx, rxq_area, 8);
	virtio_setup_queue(net, 1, &tx, txq_area, 8);
	virtio_driver_ok(net);
	tx_one(net, &tx, 0, (u64)buf, 0xfffff000u, 0);
	puts("hostile: 4 GiB TX descriptor completed\n");
	tx_one(net, &tx, 1, nowhere, 0xffffffffu, 0);
	tx_one(net, &tx, 2, (u64)buf, 1514, VRING_DESC_F_WRITE);
	puts("hostile: TX past RAM and device-writable TX completed\n");

	virtio_init(rng, 0);
	virtio_setup_queue(rng, 0, &rq, rngq_area, 8);
	virtio_driver_ok(rng);
	for (i = 0; i < 256; i++) {
		table[i].addr = (u64)buf;
		table[i].len = sizeof(buf);
		table[i].flags = VRING_DESC_F_WRITE | (i < 255 ? VRING_DESC_F_NEXT : 0);
		table[i].next = (u16)(i + 1);
	}
	rq.desc[0].addr = (u64)table;
	rq.desc[0].len = sizeof(table);
	rq.desc[0].flags = VRING_DESC_F_INDIRECT;
	got = post_wait(rng, 0, &rq, 0);
	puts("hostile: rng request of 16 MiB got ");
	put_dec(got);
	puts(" bytes\n");

	for (i = 0; i < 2000; i++) {
		virtio_init(rng, 0);
		mmio_write32(rng + VM_QUEUE_SEL, 0);
		mmio_write32(rng + VM_QUEUE_NUM, 8);
		mmio_write32(rng + VM_QUEUE_DESC_LO, 0);
		mmio_write32(rng + VM_QUEUE_DESC_HI, (u32)(nowhere >> 32));
		mmio_write32(rng + VM_QUEUE_AVAIL_LO, 0x1000);
		mmio_write32(rng + VM_QUEUE_AVAIL_HI, (u32)(nowhere >> 32));
		mmio_write32(rng + VM_QUEUE_USED_LO, 0x2000);
		mmio_write32(rng + VM_QUEUE_USED_HI, (u32)(nowhere >> 32));
		mmio_write32(rng + VM_QUEUE_READY, 1);
		virtio_driver_ok(rng);
	}
	puts("hostile: 2000 activations with a queue outside RAM\n");
	puts("hostile done\n");
	for (;;)
		cpu_relax();
}
