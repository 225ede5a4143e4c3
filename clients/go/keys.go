package idemd

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sort"
	"time"
	"unicode/utf8"
)

// uuidURLNamespace is RFC 4122's namespace for URLs.
var uuidURLNamespace = [16]byte{0x6b, 0xa7, 0xb8, 0x11, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8}

// keyNamespace is UUIDv5(URL, "urn:idemd:key"): every client language
// derives keys under it, so they agree on the key of an entity.
var keyNamespace = uuidV5(uuidURLNamespace, "urn:idemd:key")

func uuidV5(namespace [16]byte, name string) [16]byte {
	hash := sha1.New()
	hash.Write(namespace[:])
	hash.Write([]byte(name))
	var id [16]byte
	copy(id[:], hash.Sum(nil))
	id[6] = id[6]&0x0f | 0x50
	id[8] = id[8]&0x3f | 0x80
	return id
}

// EntityKey is the idempotency key of an operation on a business entity
// (EntityKey(order.ID, "charge")): a UUIDv5, the same in every client
// language, so a retry from any service finds the same record.
func EntityKey(entity, operation string) string {
	id := uuidV5(keyNamespace, operation+"\n"+entity)
	text := hex.EncodeToString(id[:])
	return text[0:8] + "-" + text[8:12] + "-" + text[12:16] + "-" + text[16:20] + "-" + text[20:]
}

// Fingerprint is SHA-256 over the request's named fields, sorted by name,
// each name and value prefixed by its length (u32, big-endian): field order
// does not matter, and no two different requests collide by concatenation.
// The same bytes in every client language. Values are bytes in a string.
func Fingerprint(fields map[string]string) []byte {
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	sort.Strings(names)
	hash := sha256.New()
	var length [4]byte
	for _, name := range names {
		for _, part := range []string{name, fields[name]} {
			binary.BigEndian.PutUint32(length[:], uint32(len(part)))
			hash.Write(length[:])
			hash.Write([]byte(part))
		}
	}
	return hash.Sum(nil)
}

// The field rules of API.md, checked before any RPC so that a bad namespace
// or key fails where it is written, not at the first call.

func validateNamespace(namespace string) error {
	if len(namespace) < 1 || len(namespace) > 64 {
		return fmt.Errorf("namespace %q: must be 1-64 characters of [a-z0-9._-]", namespace)
	}
	for _, c := range []byte(namespace) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("namespace %q: must be 1-64 characters of [a-z0-9._-]", namespace)
		}
	}
	return nil
}

func isControl(r rune) bool { return r <= 0x1f || r >= 0x7f && r <= 0x9f }

func validateText(field, value string, maxBytes int, required bool) error {
	if required && value == "" {
		return fmt.Errorf("%s is required", field)
	}
	if len(value) > maxBytes {
		return fmt.Errorf("%s: %d bytes, at most %d", field, len(value), maxBytes)
	}
	if !utf8.ValidString(value) {
		return fmt.Errorf("%s: not valid UTF-8", field)
	}
	for _, r := range value {
		if isControl(r) {
			return fmt.Errorf("%s: contains the control character %U", field, r)
		}
	}
	return nil
}

func validateKey(key string) error { return validateText("key", key, 255, true) }

func validateFingerprint(fingerprint []byte) error {
	if len(fingerprint) > 64 {
		return fmt.Errorf("fingerprint: %d bytes, at most 64 (use Fingerprint, a SHA-256)", len(fingerprint))
	}
	return nil
}

func validateResponse(response Response) error {
	return validateText("response content type", response.ContentType, 255, false)
}

func validateSettings(s *settings) error {
	switch {
	case s.leaseTTL < time.Second || s.leaseTTL > time.Hour:
		return fmt.Errorf("lease TTL %v: must be 1s to 1h", s.leaseTTL)
	case s.retention < 0:
		return fmt.Errorf("retention %v: must be positive (0: the server's default)", s.retention)
	case s.wait < 0 || s.wait > time.Minute:
		return fmt.Errorf("wait %v: must be 0 to 60s", s.wait)
	case s.inProgressBudget < 0:
		return fmt.Errorf("in-progress budget %v: must not be negative", s.inProgressBudget)
	case s.rpcRetries < 0:
		return fmt.Errorf("RPC retries %d: must not be negative", s.rpcRetries)
	case s.rpcTimeout <= 0:
		return fmt.Errorf("RPC timeout %v: must be positive", s.rpcTimeout)
	}
	return nil
}
