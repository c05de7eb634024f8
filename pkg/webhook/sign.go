// Package webhook defines what a destination receives — the impressions body
// and its Standard Webhooks signature — and sends it over HTTP.
package webhook

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Header names of Standard Webhooks (https://www.standardwebhooks.com).
const (
	HeaderID        = "webhook-id"
	HeaderTimestamp = "webhook-timestamp"
	HeaderSignature = "webhook-signature"
)

// DefaultTolerance is how far a signed timestamp may be from the receiver's
// clock; five minutes is what Standard Webhooks recommends.
const DefaultTolerance = 5 * time.Minute

const (
	secretPrefix   = "whsec_"
	minSecretBytes = 24
	maxSecretBytes = 64
	newSecretBytes = 32
)

// ErrBadSecret is returned by ParseSecret for a secret that is not
// "whsec_" followed by the base64 of 24 to 64 bytes.
var ErrBadSecret = errors.New("bad secret: want whsec_<base64 of 24-64 bytes>")

// ErrBadSignature is returned by Verify when the headers are missing or
// malformed, or no signature matches any of the secrets.
var ErrBadSignature = errors.New("bad signature")

// ErrStaleTimestamp is returned by Verify when the signed timestamp is further
// from now than the tolerance: a replayed or badly delayed message.
var ErrStaleTimestamp = errors.New("timestamp outside tolerance")

// NewSecret returns a new random signing secret in the whsec_ format.
func NewSecret() (string, error) {
	b := make([]byte, newSecretBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("new secret: %w", err)
	}
	return secretPrefix + base64.StdEncoding.EncodeToString(b), nil
}

// ParseSecret returns the key bytes of a whsec_ secret, or an error wrapping
// ErrBadSecret. The error never contains the secret.
func ParseSecret(s string) ([]byte, error) {
	enc, ok := strings.CutPrefix(s, secretPrefix)
	if !ok {
		return nil, fmt.Errorf("parse secret: no %s prefix: %w", secretPrefix, ErrBadSecret)
	}
	key, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		return nil, fmt.Errorf("parse secret: not base64: %w", ErrBadSecret)
	}
	if len(key) < minSecretBytes || len(key) > maxSecretBytes {
		return nil, fmt.Errorf("parse secret: %d bytes: %w", len(key), ErrBadSecret)
	}
	return key, nil
}

// Sign returns the Standard Webhooks v1 signature of a message:
// "v1," + base64(HMAC-SHA256(secret, id + "." + unix seconds of ts + "." + body)).
func Sign(secret []byte, id string, ts time.Time, body []byte) string {
	return "v1," + base64.StdEncoding.EncodeToString(mac(secret, id, ts.Unix(), body))
}

func mac(secret []byte, id string, unix int64, body []byte) []byte {
	h := hmac.New(sha256.New, secret)
	var prefix [64]byte
	p := append(prefix[:0], id...)
	p = append(p, '.')
	p = strconv.AppendInt(p, unix, 10)
	p = append(p, '.')
	h.Write(p)
	h.Write(body)
	return h.Sum(nil)
}

// SignatureHeader returns the webhook-signature header value: one signature
// per secret, separated by spaces, so that a receiver holding either the old
// or the new secret verifies the message during a rotation.
func SignatureHeader(secrets [][]byte, id string, ts time.Time, body []byte) string {
	sigs := make([]string, len(secrets))
	for i, s := range secrets {
		sigs[i] = Sign(s, id, ts, body)
	}
	return strings.Join(sigs, " ")
}

// Verify checks a received message the way a receiver should: the
// webhook-timestamp is within tolerance of now (DefaultTolerance when
// tolerance ≤ 0), and at least one v1 signature in webhook-signature matches
// one of secrets, compared in constant time. It returns nil, or an error
// wrapping ErrBadSignature or ErrStaleTimestamp.
func Verify(secrets [][]byte, header http.Header, body []byte, tolerance time.Duration, now time.Time) error {
	id, tsText, sigs := header.Get(HeaderID), header.Get(HeaderTimestamp), header.Get(HeaderSignature)
	if id == "" || tsText == "" || sigs == "" {
		return fmt.Errorf("verify: missing webhook headers: %w", ErrBadSignature)
	}
	unix, err := strconv.ParseInt(tsText, 10, 64)
	if err != nil {
		return fmt.Errorf("verify: timestamp %q: %w", tsText, ErrBadSignature)
	}
	if tolerance <= 0 {
		tolerance = DefaultTolerance
	}
	if d := now.Sub(time.Unix(unix, 0)).Abs(); d > tolerance {
		return fmt.Errorf("verify: timestamp %d is %s from now: %w", unix, d.Round(time.Second), ErrStaleTimestamp)
	}
	for _, secret := range secrets {
		want := mac(secret, id, unix, body)
		for sig := range strings.FieldsSeq(sigs) {
			// Other versions (e.g. v1a, asymmetric) may sit alongside v1.
			enc, ok := strings.CutPrefix(sig, "v1,")
			if !ok {
				continue
			}
			got, err := base64.StdEncoding.DecodeString(enc)
			if err == nil && subtle.ConstantTimeCompare(got, want) == 1 {
				return nil
			}
		}
	}
	return fmt.Errorf("verify: no signature matches: %w", ErrBadSignature)
}

// SigningKeys returns the keys a destination's requests are signed with: its
// current secret, and its previous one while a rotation is still in progress
// (previousExpires after now), so receivers can verify with either. An
// unusable previous secret is skipped; an unusable current one is an error
// wrapping ErrBadSecret.
func SigningKeys(current, previous string, previousExpires, now time.Time) ([][]byte, error) {
	cur, err := ParseSecret(current)
	if err != nil {
		return nil, err
	}
	keys := [][]byte{cur}
	if previous != "" && previousExpires.After(now) {
		if prev, err := ParseSecret(previous); err == nil {
			keys = append(keys, prev)
		}
	}
	return keys, nil
}
