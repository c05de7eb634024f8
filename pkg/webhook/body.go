package webhook

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"unicode/utf8"

	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
)

// Item is one impression as a destination receives it. The field order is
// the key order of the wire format.
type Item struct {
	Key                string `json:"key"`
	Split              string `json:"split"`
	EnvironmentID      string `json:"environmentId"`
	EnvironmentName    string `json:"environmentName"`
	Treatment          string `json:"treatment"`
	Time               int64  `json:"time"`
	BucketingKey       string `json:"bucketingKey"`
	Label              string `json:"label"`
	MachineName        string `json:"machineName"`
	MachineIP          string `json:"machineIp"`
	SplitVersionNumber int64  `json:"splitVersionNumber"`
	SDK                string `json:"sdk"`
	SDKVersion         string `json:"sdkVersion"`
	Properties         string `json:"properties"`
}

// EncodeBody returns the POST body for imps: the platform's impressions
// webhook format, a JSON array of flat objects with keys in the order of
// Item. An empty Properties is sent as "{}". It fails only on a nil impression.
func EncodeBody(imps []*ingestv1.Impression) ([]byte, error) {
	n := 2
	for _, imp := range imps {
		// Keys and punctuation take about 230 bytes, two int64s at most 40;
		// string fields are counted unescaped, which is exact for most data.
		n += 270 + len(imp.GetKey()) + len(imp.GetSplit()) + len(imp.GetEnvironmentId()) +
			len(imp.GetEnvironmentName()) + len(imp.GetTreatment()) + len(imp.GetBucketingKey()) +
			len(imp.GetLabel()) + len(imp.GetMachineName()) + len(imp.GetMachineIp()) +
			len(imp.GetSdk()) + len(imp.GetSdkVersion()) + len(imp.GetProperties())
	}
	return AppendBody(make([]byte, 0, n), imps)
}

// AppendBody appends the body EncodeBody would return to dst, so a caller can
// reuse buffers.
func AppendBody(dst []byte, imps []*ingestv1.Impression) ([]byte, error) {
	dst = append(dst, '[')
	for i, imp := range imps {
		if imp == nil {
			return nil, fmt.Errorf("encode body: impression %d is nil", i)
		}
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, `{"key":`...)
		dst = appendString(dst, imp.Key)
		dst = append(dst, `,"split":`...)
		dst = appendString(dst, imp.Split)
		dst = append(dst, `,"environmentId":`...)
		dst = appendString(dst, imp.EnvironmentId)
		dst = append(dst, `,"environmentName":`...)
		dst = appendString(dst, imp.EnvironmentName)
		dst = append(dst, `,"treatment":`...)
		dst = appendString(dst, imp.Treatment)
		dst = append(dst, `,"time":`...)
		dst = strconv.AppendInt(dst, imp.Time, 10)
		dst = append(dst, `,"bucketingKey":`...)
		dst = appendString(dst, imp.BucketingKey)
		dst = append(dst, `,"label":`...)
		dst = appendString(dst, imp.Label)
		dst = append(dst, `,"machineName":`...)
		dst = appendString(dst, imp.MachineName)
		dst = append(dst, `,"machineIp":`...)
		dst = appendString(dst, imp.MachineIp)
		dst = append(dst, `,"splitVersionNumber":`...)
		dst = strconv.AppendInt(dst, imp.SplitVersionNumber, 10)
		dst = append(dst, `,"sdk":`...)
		dst = appendString(dst, imp.Sdk)
		dst = append(dst, `,"sdkVersion":`...)
		dst = appendString(dst, imp.SdkVersion)
		dst = append(dst, `,"properties":`...)
		if imp.Properties == "" {
			dst = append(dst, `"{}"`...)
		} else {
			dst = appendString(dst, imp.Properties)
		}
		dst = append(dst, '}')
	}
	return append(dst, ']'), nil
}

// appendString appends s as a JSON string (RFC 8259). It escapes the quote,
// the backslash and every control character, writes invalid UTF-8 bytes as
// U+FFFD (as encoding/json does) so the body is always valid JSON, and
// escapes U+2028 and U+2029 so it is valid JavaScript too. Everything else,
// including other non-ASCII text, is copied unchanged.
func appendString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	start := 0 // s[start:i] is pending, needs no escaping.
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// DecodeBody parses a body in the impressions webhook format, for receivers
// and tests.
func DecodeBody(body []byte) ([]Item, error) {
	var items []Item
	if err := json.Unmarshal(body, &items); err != nil {
		return nil, fmt.Errorf("decode body: %w", err)
	}
	return items, nil
}

// gzipWriters holds reusable gzip writers: each carries about 800 KiB of
// compressor state, too much to allocate per request on the hot path. The
// pool is a cache with no observable state, so sharing it is safe.
var gzipWriters = sync.Pool{
	New: func() any {
		// BestSpeed: impressions JSON is repetitive and compresses well even
		// at level 1, and delivery CPU is the scarcer resource.
		w, _ := gzip.NewWriterLevel(nil, gzip.BestSpeed) // The level is valid.
		return w
	},
}

// Gzip returns body compressed with gzip, for destinations that ask for
// Content-Encoding: gzip.
func Gzip(body []byte) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(len(body)/4 + 64)
	w := gzipWriters.Get().(*gzip.Writer)
	w.Reset(&buf)
	_, werr := w.Write(body)
	cerr := w.Close()
	w.Reset(io.Discard) // So the pooled writer does not keep buf alive.
	gzipWriters.Put(w)
	if err := errors.Join(werr, cerr); err != nil {
		return nil, fmt.Errorf("gzip: %w", err)
	}
	return buf.Bytes(), nil
}

// ReadBody reads a webhook request's body as it was signed, decompressing it
// when Content-Encoding is gzip, up to limit bytes. It is for receivers: the
// demo receiver, tests and benchmarks.
func ReadBody(r *http.Request, limit int64) ([]byte, error) {
	var body io.Reader = io.LimitReader(r.Body, limit)
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			return nil, fmt.Errorf("read body: %w", err)
		}
		defer zr.Close()
		body = io.LimitReader(zr, limit)
	}
	data, err := io.ReadAll(body)
	if err != nil {
		return nil, fmt.Errorf("read body: %w", err)
	}
	return data, nil
}
