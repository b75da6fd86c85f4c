/* Freestanding runtime of the kubevmm test guests: serial, power, virtio. */
#include "guest.h"

void putc(char c)
{
	if (c == '\n')
		putc('\r');
	while (!(inb(COM1 + 5) & 0x20))
		cpu_relax();
	outb(COM1, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
	/* As Linux's console write ends: wait until the transmitter is empty.
	 * The read also hands the VMM any writes KVM queued (docs/vmm.md). */
	while (!(inb(COM1 + 5) & 0x40))
		cpu_relax();
}

void put_hex(u64 v)
{
	char buf[19];
	int i;
	buf[0] = '0';
	buf[1] = 'x';
	for (i = 0; i < 16; i++)
		buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
	buf[18] = 0;
	puts(buf);
}

void put_dec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts(&buf[i]);
}

void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *a = d;
	const u8 *b = s;
	while (n--)
		*a++ = *b++;
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

int cmdline_has(const struct hvm_start_info *si, const char *word)
{
	const char *c = (const char *)si->cmdline_paddr;
	usize n = strlen(word);
	if (!c)
		return 0;
	while (*c) {
		while (*c == ' ')
			c++;
		if (!memcmp(c, word, n) && (c[n] == ' ' || c[n] == 0))
			return 1;
		while (*c && *c != ' ')
			c++;
	}
	return 0;
}

int cmdline_get(const struct hvm_start_info *si, const char *key, char *buf, usize size)
{
	const char *c = (const char *)si->cmdline_paddr;
	usize n = strlen(key), v;
	if (!c || !size)
		return -1;
	while (*c) {
		while (*c == ' ')
			c++;
		if (!memcmp(c, key, n) && c[n] == '=') {
			c += n + 1;
			for (v = 0; c[v] && c[v] != ' '; v++)
				if (v + 1 >= size)
					return -1;
			memcpy(buf, c, v);
			buf[v] = 0;
			return (int)v;
		}
		while (*c && *c != ' ')
			c++;
	}
	return -1;
}

void fail(const char *what)
{
	puts("FAIL: ");
	puts(what);
	puts("\n");
	outb(PVPANIC_PORT, 1);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void guest_poweroff(void)
{
	/* ACPI S5: SLP_TYP from the DSDT \_S5 package (5) and SLP_EN. */
	outw(PM1_CNT, (u16)((5 << 10) | (1 << 13)));
	fail("still running after ACPI power-off");
}

u32 crc32(const u8 *p, usize n, u32 crc)
{
	/* Table-driven: the bitwise loop is too slow in KVM's emulator. */
	static u32 table[256];
	u32 i, k, c;
	if (!table[1]) {
		for (i = 0; i < 256; i++) {
			c = i;
			for (k = 0; k < 8; k++)
				c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
			table[i] = c;
		}
	}
	crc = ~crc;
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* virtio-mmio register offsets */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LO 0x080
#define VM_QUEUE_DESC_HI 0x084
#define VM_QUEUE_AVAIL_LO 0x090
#define VM_QUEUE_AVAIL_HI 0x094
#define VM_QUEUE_USED_LO 0x0a0
#define VM_QUEUE_USED_HI 0x0a4

u64 virtio_find(u32 device_id)
{
	int i;
	for (i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
		u64 b = VIRTIO_MMIO_BASE + (u64)i * VIRTIO_MMIO_STRIDE;
		if (mmio_read32(b + VM_MAGIC) == 0x74726976 && mmio_read32(b + VM_DEVICE_ID) == device_id)
			return b;
	}
	return 0;
}

u64 virtio_find_qemu(u32 device_id)
{
	int i;
	for (i = 0; i < 32; i++) {
		u64 b = 0xfeb00000ULL + (u64)i * 0x200;
		if (mmio_read32(b + VM_MAGIC) == 0x74726976 && mmio_read32(b + VM_DEVICE_ID) == device_id)
			return b;
	}
	return 0;
}

u32 virtio_init(u64 base, u32 wanted_low)
{
	u32 offered;
	if (mmio_read32(base + VM_VERSION) != 2)
		fail("virtio-mmio version is not 2");
	mmio_write32(base + VM_STATUS, 0);
	mmio_write32(base + VM_STATUS, 1);      /* ACKNOWLEDGE */
	mmio_write32(base + VM_STATUS, 1 | 2);  /* DRIVER */
	mmio_write32(base + VM_DEV_FEATURES_SEL, 1);
	if (!(mmio_read32(base + VM_DEV_FEATURES) & 1))
		fail("device does not offer VIRTIO_F_VERSION_1");
	mmio_write32(base + VM_DEV_FEATURES_SEL, 0);
	offered = mmio_read32(base + VM_DEV_FEATURES) & wanted_low;
	mmio_write32(base + VM_DRV_FEATURES_SEL, 0);
	mmio_write32(base + VM_DRV_FEATURES, offered);
	mmio_write32(base + VM_DRV_FEATURES_SEL, 1);
	mmio_write32(base + VM_DRV_FEATURES, 1);
	mmio_write32(base + VM_STATUS, 1 | 2 | 8); /* FEATURES_OK */
	if (!(mmio_read32(base + VM_STATUS) & 8))
		fail("device refused FEATURES_OK");
	return offered;
}

void virtio_setup_queue(u64 base, u32 index, struct vq *vq, void *area, u16 size)
{
	u64 a = (u64)area;
	mmio_write32(base + VM_QUEUE_SEL, index);
	if (mmio_read32(base + VM_QUEUE_NUM_MAX) < size)
		fail("queue too small");
	memset(area, 0, 3 * 4096);
	vq->size = size;
	vq->last_used = 0;
	vq->avail_idx = 0;
	vq->desc = (void *)a;
	vq->avail = (void *)(a + 4096);
	vq->used = (void *)(a + 8192);
	mmio_write32(base + VM_QUEUE_NUM, size);
	mmio_write32(base + VM_QUEUE_DESC_LO, (u32)a);
	mmio_write32(base + VM_QUEUE_DESC_HI, (u32)(a >> 32));
	mmio_write32(base + VM_QUEUE_AVAIL_LO, (u32)(a + 4096));
	mmio_write32(base + VM_QUEUE_AVAIL_HI, (u32)((a + 4096) >> 32));
	mmio_write32(base + VM_QUEUE_USED_LO, (u32)(a + 8192));
	mmio_write32(base + VM_QUEUE_USED_HI, (u32)((a + 8192) >> 32));
	mmio_write32(base + VM_QUEUE_READY, 1);
}

void virtio_driver_ok(u64 base)
{
	mmio_write32(base + VM_STATUS, 1 | 2 | 8 | 4);
}

void virtio_notify(u64 base, u32 index)
{
	barrier();
	mmio_write32(base + VM_QUEUE_NOTIFY, index);
}

u32 vq_wait_used(struct vq *vq)
{
	u32 len;
	while (vq->used->idx == vq->last_used)
		cpu_relax();
	barrier();
	len = vq->used->ring[vq->last_used % vq->size].len;
	vq->last_used++;
	return len;
}
