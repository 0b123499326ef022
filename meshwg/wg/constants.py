"""WireGuard protocol constants (WireGuard whitepaper §5.4 and §6.1; wireguard-go device/constants.go)."""

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_LEN = 32
TAG_LEN = 16
COOKIE_LEN = 16  # also the length of mac1 and mac2 (the kernel's message_macs)
COOKIE_NONCE_LEN = 24

# Message types and sizes (whitepaper §5.4.2-§5.4.7).
MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + TAG_LEN  # 32: the smallest valid transport message
INITIATION_MAC1_OFFSET = 116
INITIATION_MAC2_OFFSET = 132
RESPONSE_MAC1_OFFSET = 60
RESPONSE_MAC2_OFFSET = 76

DEFAULT_MTU = 1420

# Timers and limits (whitepaper §6.1; the jitter and the 540 s key zeroing as wireguard-go).
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1  # wireguard-go value
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX_MS = 334  # jitter is uniform in [0, 333] ms
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18 -> 20 initiations in total
KEEPALIVE_TIMEOUT = 10.0
NEW_HANDSHAKE_TIMEOUT = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # "peer went quiet", plus jitter
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3  # 540 s
LAST_MINUTE_HANDSHAKE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # 20 ms between consumed initiations per peer
MAX_STAGED_PACKETS = 128

# Load and rate limiting (wireguard-go device.go IsUnderLoad, ratelimiter/ratelimiter.go).
UNDER_LOAD_QUEUE_LENGTH = 1024 // 8  # 128 queued handshake messages
UNDER_LOAD_AFTER_TIME = 1.0
RATELIMIT_PACKETS_PER_SECOND = 20
RATELIMIT_BURST = 5
RATELIMIT_GC_INTERVAL = 1.0

# Replay window (RFC 6479, as wireguard-go replay/replay.go): 128 blocks of 64 bits; one block is kept in
# reserve for the ring.
REPLAY_BLOCKS = 128
REPLAY_WINDOW = (REPLAY_BLOCKS - 1) * 64  # 8128
