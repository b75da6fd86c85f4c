/* rng: asks virtio-rng for 64 bytes twice and checks they are not constant. */
#include "guest.h"

static u8 queue_area[3 * 4096] __attribute__((aligned(4096)));
static u8 buf[2][64];

void guest_main(struct hvm_start_info *si)
{
	struct vq vq;
	u64 base = virtio_find(4);
	u32 got, i, same = 0, zero = 0;
	int r;
	(void)si;
	if (!base)
		fail("no virtio-rng device");
	virtio_init(base, 0);
	virtio_setup_queue(base, 0, &vq, queue_area, 8);
	virtio_driver_ok(base);
	for (r = 0; r < 2; r++) {
		vq.desc[r].addr = (u64)buf[r];
		vq.desc[r].len = 64;
		vq.desc[r].flags = VRING_DESC_F_WRITE;
		vq.avail->ring[r] = (u16)r;
		barrier();
		vq.avail->idx = (u16)(r + 1);
		virtio_notify(base, 0);
		got = vq_wait_used(&vq);
		if (got != 64)
			fail("short random read");
	}
	for (i = 0; i < 64; i++) {
		same += buf[0][i] == buf[1][i];
		zero += buf[0][i] == 0;
	}
	if (same > 8 || zero > 8)
		fail("random bytes look constant");
	puts("rng bytes ");
	put_hex(*(u64 *)buf[0]);
	puts("\nrng test passed\n");
}
