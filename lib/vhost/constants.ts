/**
 * vhost-user protocol constants as QEMU 10.2-11.1 speaks them (docs/interop/vhost-user.rst and
 * hw/virtio/vhost-user.c). Spec names are kept. Pure data.
 */

/** Front-end -> back-end requests, ids 1-45. */
export enum FrontendRequest {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  CREATE_CRYPTO_SESSION = 26,
  CLOSE_CRYPTO_SESSION = 27,
  POSTCOPY_ADVISE = 28,
  POSTCOPY_LISTEN = 29,
  POSTCOPY_END = 30,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  GPU_SET_SOCKET = 33,
  RESET_DEVICE = 34,
  VRING_KICK = 35,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
  GET_SHARED_OBJECT = 41,
  SET_DEVICE_STATE_FD = 42,
  CHECK_DEVICE_STATE = 43,
  GET_SHMEM_CONFIG = 44,
  GET_VRING_BASE_SKIP_DRAIN = 45,
}

/** Back-end -> front-end requests (on the SET_BACKEND_REQ_FD channel). */
export enum BackendRequest {
  IOTLB_MSG = 1,
  CONFIG_CHANGE_MSG = 2,
  VRING_HOST_NOTIFIER_MSG = 3,
  VRING_CALL = 4,
  VRING_ERR = 5,
  SHARED_OBJECT_ADD = 6,
  SHARED_OBJECT_REMOVE = 7,
  SHARED_OBJECT_LOOKUP = 8,
  SHMEM_MAP = 9,
  SHMEM_UNMAP = 10,
}

/** Protocol feature bit numbers. */
export enum ProtocolFeature {
  MQ = 0,
  LOG_SHMFD = 1,
  RARP = 2,
  REPLY_ACK = 3,
  NET_MTU = 4,
  BACKEND_REQ = 5,
  CROSS_ENDIAN = 6,
  CRYPTO_SESSION = 7,
  PAGEFAULT = 8,
  CONFIG = 9,
  BACKEND_SEND_FD = 10,
  HOST_NOTIFIER = 11,
  INFLIGHT_SHMFD = 12,
  RESET_DEVICE = 13,
  INBAND_NOTIFICATIONS = 14,
  CONFIGURE_MEM_SLOTS = 15,
  STATUS = 16,
  XEN_MMAP = 17,
  SHARED_OBJECT = 18,
  DEVICE_STATE = 19,
  GET_VRING_BASE_INFLIGHT = 20,
  GPA_ADDRESSES = 21,
  SHMEM = 22,
  GET_VRING_BASE_SKIP_DRAIN = 23,
}

/** A protocol feature bit as a mask. */
export function protocolBit(f: ProtocolFeature): bigint {
  return 1n << BigInt(f);
}

/** The protocol features this back-end implements and offers (never INBAND_NOTIFICATIONS). */
export const SUPPORTED_PROTOCOL_FEATURES: bigint =
  protocolBit(ProtocolFeature.MQ) |
  protocolBit(ProtocolFeature.REPLY_ACK) |
  protocolBit(ProtocolFeature.BACKEND_REQ) |
  protocolBit(ProtocolFeature.CONFIG) |
  protocolBit(ProtocolFeature.RESET_DEVICE) |
  protocolBit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  protocolBit(ProtocolFeature.STATUS);

/** Virtio feature bit 30: the back-end understands GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 1n << 30n;

/** Virtio transport feature bits the back-end layer knows about. */
export const VIRTIO_RING_F_INDIRECT_DESC = 1n << 28n;
export const VIRTIO_RING_F_EVENT_IDX = 1n << 29n;
export const VIRTIO_F_VERSION_1 = 1n << 32n;

/** Header flags. */
export const VHOST_USER_VERSION = 0x1;
export const VHOST_USER_VERSION_MASK = 0x3;
export const VHOST_USER_REPLY_MASK = 0x4;
export const VHOST_USER_NEED_REPLY_MASK = 0x8;
/** Flags of every reply we send: version 1 | REPLY. QEMU rejects anything else. */
export const VHOST_USER_REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK;

/** SET_VRING_KICK/CALL/ERR payload: bits 0-7 queue index, bit 8 "no fd". */
export const VHOST_USER_VRING_IDX_MASK = 0xffn;
export const VHOST_USER_VRING_NOFD_MASK = 0x100n;
/** SET_VRING_ADDR flags bit 0: log the used ring (migration). */
export const VHOST_VRING_F_LOG = 0x1;

export const HEADER_BYTES = 12;
/** Largest payload accepted; checked before any byte of it is buffered (rust-vmm uses 4096 too). */
export const MAX_PAYLOAD_BYTES = 4096;
/** Most descriptors one message may carry (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_FDS_PER_MESSAGE = 8;
/** Regions in one SET_MEM_TABLE. */
export const MAX_MEM_TABLE_REGIONS = 8;
/** Memory slots answered to GET_MAX_MEM_SLOTS (as libvhost-user and rust-vmm do); never lowered. */
export const MAX_MEM_SLOTS = 509;
/** VHOST_USER_MAX_CONFIG_SIZE. */
export const MAX_CONFIG_BYTES = 256;
/** Size of one memory region description on the wire. */
export const MEMORY_REGION_BYTES = 32;
