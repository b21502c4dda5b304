/*
 * What Python sees of <linux/kvmlu.h>. The layouts and values are not
 * restated: "...;" and "..." make the C compiler fill them in from the real
 * header when the cffi extension is built (see pyctl/_build.py).
 */
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef unsigned char __u8;

#define KVMLU_IOCTL_TYPE ...
#define KVMLU_API_VERSION ...
#define KVMLU_MAX_VCPUS ...
#define KVMLU_VECTOR_MIN ...
#define KVMLU_VECTOR_MAX ...
#define KVMLU_NR_VECTORS ...

static const int KVMLU_CMD_BASE;
static const int KVMLU_CMD_QUERY;
static const int KVMLU_CMD_CREATE_TABLE;
static const int KVMLU_CMD_CREATE_SESSION;
static const int KVMLU_CMD_RETRIEVE_SESSION;
static const int KVMLU_CMD_LIST_SESSIONS;
static const int KVMLU_SESSION_CMD_BASE;
static const int KVMLU_CMD_SESSION_PRESERVE;
static const int KVMLU_CMD_SESSION_RETRIEVE;
static const int KVMLU_CMD_SESSION_UNPRESERVE;
static const int KVMLU_CMD_SESSION_FINISH;
static const int KVMLU_TABLE_CMD_BASE;
static const int KVMLU_CMD_TABLE_SET_NOTIFY;
static const int KVMLU_CMD_TABLE_SET_SN;
static const int KVMLU_CMD_TABLE_PEEK;
static const int KVMLU_CMD_TABLE_FETCH;
static const int KVMLU_CMD_TABLE_POST;
static const int KVMLU_CMD_TABLE_BIND;
static const int KVMLU_CMD_TABLE_INFO;
static const int KVMLU_BINDING_CMD_BASE;
static const int KVMLU_CMD_BINDING_INFO;

#define KVMLU_QUERY ...
#define KVMLU_CREATE_TABLE ...
#define KVMLU_CREATE_SESSION ...
#define KVMLU_RETRIEVE_SESSION ...
#define KVMLU_LIST_SESSIONS ...
#define KVMLU_SESSION_PRESERVE ...
#define KVMLU_SESSION_RETRIEVE ...
#define KVMLU_SESSION_UNPRESERVE ...
#define KVMLU_SESSION_FINISH ...
#define KVMLU_TABLE_SET_NOTIFY ...
#define KVMLU_TABLE_SET_SN ...
#define KVMLU_TABLE_PEEK ...
#define KVMLU_TABLE_FETCH ...
#define KVMLU_TABLE_POST ...
#define KVMLU_TABLE_BIND ...
#define KVMLU_TABLE_INFO ...
#define KVMLU_BINDING_INFO ...

#define KVMLU_CAP_TABLES ...
#define KVMLU_CAP_BINDINGS ...
#define KVMLU_BINDING_ACTIVE ...
#define KVMLU_BINDING_HUP ...
#define KVMLU_CAP_SESSIONS ...
#define KVMLU_SET_NOTIFY_ATTACH ...
#define KVMLU_SET_NOTIFY_FLAGS ...
#define KVMLU_SESSION_NAME_LEN ...
#define KVMLU_SESSION_HELD ...

#define KVMLU_PI_ON_BIT ...
#define KVMLU_PI_SN_BIT ...
#define KVMLU_PI_NV_SHIFT ...
#define KVMLU_PI_NV_MASK ...
#define KVMLU_PI_NDST_SHIFT ...
#define KVMLU_PI_NDST_MASK ...

#define KVMLU_POST_COALESCED ...
#define KVMLU_POST_SUPPRESSED ...
#define KVMLU_POST_NOTIFIED ...

struct kvmlu_pi_desc {
	__u64 pir[4];
	__u64 control;
	__u64 reserved[3];
	...;
};

struct kvmlu_stats {
	__u64 signals;
	__u64 posted;
	__u64 coalesced;
	__u64 notified;
	__u64 suppressed;
	...;
};

struct kvmlu_query {
	__u32 size;
	__u32 flags;
	__u32 api_version;
	__u32 max_vcpus;
	__u64 capabilities;
	__u64 nr_tables;
	__u64 nr_bindings;
	__u32 nr_sessions;
	__u32 reserved;
	struct kvmlu_stats stats;
	...;
};

struct kvmlu_create_table {
	__u32 size;
	__u32 flags;
	__u32 nr_vcpus;
	__s32 fd;
	...;
};

struct kvmlu_table_set_notify {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__s32 eventfd;
	__u32 nv;
	__u32 ndst;
	...;
};

struct kvmlu_table_set_sn {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 suppress;
	...;
};

struct kvmlu_table_peek {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 reserved;
	struct kvmlu_pi_desc desc;
	...;
};

struct kvmlu_table_fetch {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 reserved;
	__u64 pir[4];
	...;
};

struct kvmlu_table_post {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 vector;
	__u32 result;
	__u32 reserved;
	...;
};

struct kvmlu_table_bind {
	__u32 size;
	__u32 flags;
	__s32 eventfd;
	__u32 vcpu;
	__u32 vector;
	__s32 fd;
	...;
};


struct kvmlu_table_info {
	__u32 size;
	__u32 flags;
	__u32 nr_vcpus;
	__u32 nr_bindings;
	struct kvmlu_stats stats;
	...;
};

struct kvmlu_binding_info {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 vector;
	__u32 state;
	__u32 reserved;
	struct kvmlu_stats stats;
	...;
};

struct kvmlu_session_create {
	__u32 size;
	__u32 flags;
	__u8 name[64];
	__s32 fd;
	__u32 reserved;
	...;
};

struct kvmlu_session_entry {
	__u8 name[64];
	__u32 nr_objects;
	__u32 state;
	...;
};

struct kvmlu_list_sessions {
	__u32 size;
	__u32 flags;
	__u32 count;
	__u32 nr_sessions;
	__u64 entries;
	...;
};

struct kvmlu_session_preserve {
	__u32 size;
	__u32 flags;
	__s32 fd;
	__u32 reserved;
	__u64 token;
	...;
};

struct kvmlu_session_token {
	__u32 size;
	__u32 flags;
	__u64 token;
	__s32 fd;
	__u32 reserved;
	...;
};

struct kvmlu_session_finish {
	__u32 size;
	__u32 flags;
	...;
};

static const int KVMLU_VAPIC_DEV_CMD_BASE;
static const int KVMLU_CMD_VAPIC_QUERY;
static const int KVMLU_CMD_CREATE_VAPIC;
static const int KVMLU_VAPIC_CMD_BASE;
static const int KVMLU_CMD_VAPIC_SYNC;
static const int KVMLU_CMD_VAPIC_ACK;
static const int KVMLU_CMD_VAPIC_EOI;
static const int KVMLU_CMD_VAPIC_GET;
static const int KVMLU_CMD_VAPIC_SAVE;
static const int KVMLU_CMD_VAPIC_LOAD;
#define KVMLU_VAPIC_QUERY ...
#define KVMLU_CREATE_VAPIC ...
#define KVMLU_VAPIC_SYNC ...
#define KVMLU_VAPIC_ACK ...
#define KVMLU_VAPIC_EOI ...
#define KVMLU_VAPIC_GET ...
#define KVMLU_VAPIC_SAVE ...
#define KVMLU_VAPIC_LOAD ...
#define KVMLU_VAPIC_MAGIC ...

struct kvmlu_vapic_query {
	__u32 size;
	__u32 flags;
	__u32 version;
	__u32 min_load_version;
	__u32 vcpu_record_size;
	__u32 reserved;
	...;
};

struct kvmlu_create_vapic {
	__u32 size;
	__u32 flags;
	__s32 table_fd;
	__s32 fd;
	...;
};

struct kvmlu_vapic_vcpu {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 vector;
	__u64 irr[4];
	__u64 isr[4];
	__u64 tmr[4];
	__u64 moved[4];
	...;
};

typedef unsigned short __u16;

struct kvmlu_vapic_blob {
	__u32 magic;
	__u16 version;
	__u16 header_size;
	__u32 size;
	__u32 nr_vcpus;
	__u32 vcpu_size;
	__u32 checksum;
	...;
};

struct kvmlu_vapic_save {
	__u32 size;
	__u32 flags;
	__u64 buf;
	__u32 buf_len;
	__u32 blob_size;
	__u32 format;
	__u32 reserved;
	...;
};

struct kvmlu_vapic_load {
	__u32 size;
	__u32 flags;
	__u64 buf;
	__u32 buf_len;
	__u32 reserved;
	...;
};

int ioctl(int fd, unsigned long request, ...);
