/* Freestanding helpers shared by the kubevmm test guests. */
#ifndef KUBEVMM_GUEST_H
#define KUBEVMM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

/* Platform layout promised by the VMM (docs/vmm.md). */
#define COM1 0x3f8
#define PM1_STS 0x600
#define PM1_EN 0x602
#define PM1_CNT 0x604
#define PVPANIC_PORT 0x505
#define POST_PORT 0x80
#define VIRTIO_MMIO_BASE 0xd0000000ULL
#define VIRTIO_MMIO_STRIDE 0x1000
#define VIRTIO_MMIO_SLOTS 8

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

void putc(char c);
void puts(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
/* Returns 1 when the kernel command line contains word. */
int cmdline_has(const struct hvm_start_info *si, const char *word);
/* Copies the value of the first key=value word on the kernel command line
 * into buf, NUL-terminated; returns its length, or -1 when there is no such
 * word or its value does not fit in size - 1 bytes. */
int cmdline_get(const struct hvm_start_info *si, const char *key, char *buf, usize size);
/* Reports a failure on serial, then asks the VMM to record a guest panic. */
void fail(const char *what) __attribute__((noreturn));
void guest_poweroff(void) __attribute__((noreturn));
void guest_main(struct hvm_start_info *si);
u32 crc32(const u8 *p, usize n, u32 crc);

/* virtio-mmio (version 2) driver helpers, polling only. */
struct vq {
	u16 size;
	u16 last_used;
	u16 avail_idx;
	volatile struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile struct vring_used *used;
};
struct vring_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vring_avail { u16 flags; u16 idx; u16 ring[]; };
struct vring_used_elem { u32 id; u32 len; };
struct vring_used { u16 flags; u16 idx; struct vring_used_elem ring[]; };
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

/* Finds the first virtio-mmio device of type id, 0 if none. */
u64 virtio_find(u32 device_id);
/* The same where QEMU's microvm puts its virtio-mmio slots (version 2 with
 * -global virtio-mmio.force-legacy=false). */
u64 virtio_find_qemu(u32 device_id);
/* Resets and negotiates features (VERSION_1 plus wanted & offered); returns
 * the accepted low feature word. Sets up queue q at memory area. */
u32 virtio_init(u64 base, u32 wanted_low);
void virtio_setup_queue(u64 base, u32 index, struct vq *vq, void *area, u16 size);
void virtio_driver_ok(u64 base);
void virtio_notify(u64 base, u32 index);
/* Waits until the device returned one buffer; returns its used length. */
u32 vq_wait_used(struct vq *vq);

#endif
