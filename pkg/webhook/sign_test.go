package webhook

import (
	"encoding/base64"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The published Standard Webhooks test vector.
const (
	vectorSecret    = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	vectorID        = "msg_p5jXN8AQM9LWM0D4loKWxJek"
	vectorTimestamp = 1614265330
	vectorPayload   = `{"test": 2432232314}`
	vectorSignature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
)

func mustSecret(t testing.TB, s string) []byte {
	t.Helper()
	key, err := ParseSecret(s)
	if err != nil {
		t.Fatalf("ParseSecret: %v", err)
	}
	return key
}

func TestSignStandardWebhooksVector(t *testing.T) {
	got := Sign(mustSecret(t, vectorSecret), vectorID, time.Unix(vectorTimestamp, 0), []byte(vectorPayload))
	if got != vectorSignature {
		t.Fatalf("Sign = %s, want %s", got, vectorSignature)
	}
}

func TestParseSecret(t *testing.T) {
	b64 := func(n int) string { return base64.StdEncoding.EncodeToString(make([]byte, n)) }
	tests := []struct {
		name   string
		secret string
		bytes  int
	}{
		{name: "vector", secret: vectorSecret, bytes: 24},
		{name: "24 bytes", secret: "whsec_" + b64(24), bytes: 24},
		{name: "64 bytes", secret: "whsec_" + b64(64), bytes: 64},
		{name: "23 bytes", secret: "whsec_" + b64(23)},
		{name: "65 bytes", secret: "whsec_" + b64(65)},
		{name: "no prefix", secret: b64(32)},
		{name: "wrong prefix", secret: "whsek_" + b64(32)},
		{name: "empty", secret: ""},
		{name: "prefix only", secret: "whsec_"},
		{name: "not base64", secret: "whsec_!!!!" + b64(32)},
		{name: "url base64", secret: "whsec_" + strings.Repeat("-_", 16)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, err := ParseSecret(tt.secret)
			if tt.bytes == 0 {
				if !errors.Is(err, ErrBadSecret) {
					t.Fatalf("ParseSecret = %v, want ErrBadSecret", err)
				}
				if enc := strings.TrimPrefix(tt.secret, "whsec_"); len(enc) > 8 && strings.Contains(err.Error(), enc) {
					t.Fatalf("error %q contains the secret", err)
				}
				return
			}
			if err != nil || len(key) != tt.bytes {
				t.Fatalf("ParseSecret = %d bytes, %v; want %d bytes", len(key), err, tt.bytes)
			}
		})
	}
}

func TestNewSecret(t *testing.T) {
	a, err := NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	if a == b {
		t.Fatal("two NewSecret calls returned the same secret")
	}
	if key := mustSecret(t, a); len(key) != 32 {
		t.Fatalf("NewSecret key is %d bytes, want 32", len(key))
	}
}

func signedHeader(secrets [][]byte, id string, ts time.Time, body []byte) http.Header {
	h := http.Header{}
	h.Set(HeaderID, id)
	h.Set(HeaderTimestamp, strconv.FormatInt(ts.Unix(), 10))
	h.Set(HeaderSignature, SignatureHeader(secrets, id, ts, body))
	return h
}

func TestVerify(t *testing.T) {
	vector := mustSecret(t, vectorSecret)
	other := mustSecret(t, "whsec_"+base64.StdEncoding.EncodeToString([]byte("another-secret-of-32-bytes-long!")))
	ts := time.Unix(vectorTimestamp, 0)
	body := []byte(vectorPayload)
	good := signedHeader([][]byte{vector}, vectorID, ts, body)
	with := func(key, value string) http.Header {
		h := good.Clone()
		if value == "" {
			h.Del(key)
		} else {
			h.Set(key, value)
		}
		return h
	}
	tests := []struct {
		name    string
		secrets [][]byte
		header  http.Header
		body    string
		now     time.Time
		want    error
	}{
		{name: "vector", secrets: [][]byte{vector}, header: good},
		{name: "vector header as published", secrets: [][]byte{vector}, header: with(HeaderSignature, vectorSignature)},
		{name: "second of two secrets", secrets: [][]byte{other, vector}, header: good},
		{name: "rotation: both signatures", secrets: [][]byte{other}, header: signedHeader([][]byte{vector, other}, vectorID, ts, body)},
		{name: "other versions alongside", secrets: [][]byte{vector}, header: with(HeaderSignature, "v1a,abc v2,zzz "+vectorSignature)},
		{name: "within tolerance", secrets: [][]byte{vector}, header: good, now: ts.Add(-4 * time.Minute)},
		{name: "wrong secret", secrets: [][]byte{other}, header: good, want: ErrBadSignature},
		{name: "no secrets", header: good, want: ErrBadSignature},
		{name: "tampered body", secrets: [][]byte{vector}, header: good, body: `{"test": 2432232315}`, want: ErrBadSignature},
		{name: "other id", secrets: [][]byte{vector}, header: with(HeaderID, "msg_other"), want: ErrBadSignature},
		{name: "other timestamp", secrets: [][]byte{vector}, header: with(HeaderTimestamp, strconv.Itoa(vectorTimestamp+1)), want: ErrBadSignature},
		{name: "no id", secrets: [][]byte{vector}, header: with(HeaderID, ""), want: ErrBadSignature},
		{name: "no timestamp", secrets: [][]byte{vector}, header: with(HeaderTimestamp, ""), want: ErrBadSignature},
		{name: "bad timestamp", secrets: [][]byte{vector}, header: with(HeaderTimestamp, "yesterday"), want: ErrBadSignature},
		{name: "no signature", secrets: [][]byte{vector}, header: with(HeaderSignature, ""), want: ErrBadSignature},
		{name: "no v1 signature", secrets: [][]byte{vector}, header: with(HeaderSignature, "v2,"+vectorSignature[3:]), want: ErrBadSignature},
		{name: "bad base64", secrets: [][]byte{vector}, header: with(HeaderSignature, "v1,***"), want: ErrBadSignature},
		{name: "stale", secrets: [][]byte{vector}, header: good, now: ts.Add(6 * time.Minute), want: ErrStaleTimestamp},
		{name: "future", secrets: [][]byte{vector}, header: good, now: ts.Add(-6 * time.Minute), want: ErrStaleTimestamp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, now := body, tt.now
			if tt.body != "" {
				b = []byte(tt.body)
			}
			if now.IsZero() {
				now = ts
			}
			err := Verify(tt.secrets, tt.header, b, 0, now)
			if !errors.Is(err, tt.want) { // errors.Is(nil, nil) is true.
				t.Fatalf("Verify = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestSigningKeys(t *testing.T) {
	cur, _ := NewSecret()
	prev, _ := NewSecret()
	now := time.Unix(1_700_000_000, 0)
	tests := []struct {
		name     string
		current  string
		previous string
		expires  time.Time
		want     int
		wantErr  bool
	}{
		{"current only", cur, "", time.Time{}, 1, false},
		{"rotation in progress", cur, prev, now.Add(time.Hour), 2, false},
		{"rotation over", cur, prev, now.Add(-time.Second), 1, false},
		{"unusable previous is skipped", cur, "whsec_bad", now.Add(time.Hour), 1, false},
		{"unusable current", "nope", prev, now.Add(time.Hour), 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := SigningKeys(tt.current, tt.previous, tt.expires, now)
			if (err != nil) != tt.wantErr || len(keys) != tt.want {
				t.Fatalf("got %d keys, err %v; want %d, error %v", len(keys), err, tt.want, tt.wantErr)
			}
			if tt.wantErr && !errors.Is(err, ErrBadSecret) {
				t.Errorf("error %v does not wrap ErrBadSecret", err)
			}
		})
	}
}
