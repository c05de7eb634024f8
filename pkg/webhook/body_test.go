package webhook

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
	"testing"

	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
)

func TestEncodeBodyFormat(t *testing.T) {
	// The example of "What a destination receives" in DESIGN.md, byte for byte.
	imp := &ingestv1.Impression{
		Key: "user-1", Split: "new_checkout", EnvironmentId: "env-1", EnvironmentName: "prod",
		Treatment: "on", Time: 1700000000000, BucketingKey: "user-1", Label: "default rule",
		MachineName: "host-7", MachineIp: "10.0.0.7", SplitVersionNumber: 1699999999999,
		Sdk: "go", SdkVersion: "6.4.0",
	}
	want := `[{"key":"user-1","split":"new_checkout","environmentId":"env-1","environmentName":"prod",` +
		`"treatment":"on","time":1700000000000,"bucketingKey":"user-1","label":"default rule",` +
		`"machineName":"host-7","machineIp":"10.0.0.7","splitVersionNumber":1699999999999,` +
		`"sdk":"go","sdkVersion":"6.4.0","properties":"{}"}]`
	got, err := EncodeBody([]*ingestv1.Impression{imp})
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Fatalf("EncodeBody =\n%s\nwant\n%s", got, want)
	}

	imp.Properties = `{"plan":"pro"}`
	got, err = EncodeBody([]*ingestv1.Impression{imp, imp})
	if err != nil {
		t.Fatal(err)
	}
	one := strings.TrimSuffix(strings.TrimPrefix(want, "["), "]")
	one = strings.Replace(one, `"properties":"{}"`, `"properties":"{\"plan\":\"pro\"}"`, 1)
	if want := "[" + one + "," + one + "]"; string(got) != want {
		t.Fatalf("EncodeBody =\n%s\nwant\n%s", got, want)
	}
}

func TestEncodeBodyEmptyAndNil(t *testing.T) {
	got, err := EncodeBody(nil)
	if err != nil || string(got) != "[]" {
		t.Fatalf("EncodeBody(nil) = %q, %v; want []", got, err)
	}
	if _, err := EncodeBody([]*ingestv1.Impression{{Key: "k"}, nil}); err == nil {
		t.Fatal("EncodeBody with a nil impression: want error")
	}
}

// hardStrings need escaping or special care in JSON.
func hardStrings() []string {
	var controls strings.Builder
	for c := range 0x20 {
		controls.WriteByte(byte(c))
	}
	return []string{
		"",
		"plain ascii",
		`"quoted" and \backslashed\ and /slashed/`,
		controls.String(),
		"del \x7f",
		"é 日本語 🚀 ẞ \u00a0 \ufeff",
		"line\u2028para\u2029end",
		"</script><b>&amp;",
		"\xff\xfe invalid",
		"truncated \xe6\x97",
		"surrogate \xed\xa0\x80",
		"\\u0041 literal escape",
		`{"nested":"json","n":[1,2]}`,
	}
}

// decoded is what a JSON decoder must read back for s: s itself, with each
// invalid UTF-8 byte replaced by U+FFFD.
func decoded(s string) string { return string([]rune(s)) }

func TestEncodeBodyRoundTrip(t *testing.T) {
	for i, s := range hardStrings() {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			imp := &ingestv1.Impression{
				Key: s, Split: s, EnvironmentId: s, EnvironmentName: s, Treatment: s,
				Time: math.MaxInt64, BucketingKey: s, Label: s, MachineName: s, MachineIp: s,
				SplitVersionNumber: math.MinInt64, Sdk: s, SdkVersion: s, Properties: s,
			}
			body, err := EncodeBody([]*ingestv1.Impression{imp})
			if err != nil {
				t.Fatal(err)
			}
			if !json.Valid(body) {
				t.Fatalf("invalid JSON: %q", body)
			}
			items, err := DecodeBody(body)
			if err != nil {
				t.Fatal(err)
			}
			d, props := decoded(s), decoded(s)
			if s == "" {
				props = "{}"
			}
			want := Item{
				Key: d, Split: d, EnvironmentID: d, EnvironmentName: d, Treatment: d,
				Time: math.MaxInt64, BucketingKey: d, Label: d, MachineName: d, MachineIP: d,
				SplitVersionNumber: math.MinInt64, SDK: d, SDKVersion: d, Properties: props,
			}
			if len(items) != 1 || items[0] != want {
				t.Fatalf("round trip of %q:\n got %+v\nwant %+v", s, items, want)
			}
		})
	}
}

func FuzzAppendString(f *testing.F) {
	for _, s := range hardStrings() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		enc := appendString(nil, s)
		var got string
		if err := json.Unmarshal(enc, &got); err != nil {
			t.Fatalf("appendString(%q) = %q: %v", s, enc, err)
		}
		if got != decoded(s) {
			t.Fatalf("appendString(%q) round trip = %q", s, got)
		}
	})
}

func TestDecodeBodyRejectsGarbage(t *testing.T) {
	for _, body := range []string{"", "{}", `[{"key":1}]`, "[", "null x"} {
		if _, err := DecodeBody([]byte(body)); err == nil {
			t.Errorf("DecodeBody(%q): want error", body)
		}
	}
}

func TestGzip(t *testing.T) {
	// Several rounds, so pooled writers are reused and must be reset properly.
	for i := range 4 {
		body := bytes.Repeat([]byte(fmt.Sprintf(`{"round":%d}`, i)), 1000*i)
		z, err := Gzip(body)
		if err != nil {
			t.Fatal(err)
		}
		r, err := gzip.NewReader(bytes.NewReader(z))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, body) {
			t.Fatalf("round %d: gunzip(Gzip(body)) differs", i)
		}
	}
}

func benchImpressions(n int) []*ingestv1.Impression {
	imps := make([]*ingestv1.Impression, n)
	for i := range imps {
		imps[i] = &ingestv1.Impression{
			Key: fmt.Sprintf("user-%d", i), Split: "new_checkout", EnvironmentId: "env-1",
			EnvironmentName: "prod", Treatment: "on", Time: 1700000000000 + int64(i),
			BucketingKey: fmt.Sprintf("user-%d", i), Label: "default rule", MachineName: "host-7",
			MachineIp: "10.0.0.7", SplitVersionNumber: 1699999999999, Sdk: "go", SdkVersion: "6.4.0",
			Properties: `{"plan":"pro","région":"eu"}`,
		}
	}
	return imps
}

func BenchmarkEncodeBody500(b *testing.B) {
	imps := benchImpressions(500)
	body, _ := EncodeBody(imps)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := EncodeBody(imps); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGzip500(b *testing.B) {
	body, _ := EncodeBody(benchImpressions(500))
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Gzip(body); err != nil {
			b.Fatal(err)
		}
	}
}
