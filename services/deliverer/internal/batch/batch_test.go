package batch

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

func item(id string, impressions, bytes int) Item[int] {
	return Item[int]{ID: id, Impressions: impressions, Bytes: bytes}
}

func newBuilder(t testing.TB, l Limits) *Builder[int] {
	t.Helper()
	b, err := NewBuilder[int](l)
	if err != nil {
		t.Fatalf("NewBuilder(%+v): %v", l, err)
	}
	return b
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		l    Limits
		ok   bool
	}{
		{"default", testLimits(), true},
		{"no linger", Limits{MaxImpressions: 1, MaxBytes: 1}, true},
		{"zero impressions", Limits{MaxBytes: 1}, false},
		{"zero bytes", Limits{MaxImpressions: 1}, false},
		{"negative linger", Limits{MaxImpressions: 1, MaxBytes: 1, Linger: -1}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.l.Validate()
			if tt.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidLimits)) {
				t.Fatalf("Validate() = %v, want ok=%v", err, tt.ok)
			}
			if _, err := NewBuilder[int](tt.l); tt.ok != (err == nil) {
				t.Fatalf("NewBuilder() = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

// TestBuilderLimits adds items in order and checks, for each, whether it fits
// and whether the builder is full afterwards; an item that does not fit starts
// the next batch, as the deliverer does.
func TestBuilderLimits(t *testing.T) {
	limits := Limits{MaxImpressions: 100, MaxBytes: 1000, Linger: time.Second}
	type step struct {
		it       Item[int]
		fits     bool
		fullThen bool
	}
	tests := []struct {
		name    string
		steps   []step
		batches [][]string // ids of the batches taken, in order, the open one last
	}{
		{
			name: "under the limits",
			steps: []step{
				{item("a", 10, 100), true, false},
				{item("b", 10, 100), true, false},
			},
			batches: [][]string{{"a", "b"}},
		},
		{
			name: "exactly the impression limit",
			steps: []step{
				{item("a", 60, 10), true, false},
				{item("b", 40, 10), true, true},
				{item("c", 0, 0), false, false},
			},
			batches: [][]string{{"a", "b"}, {"c"}},
		},
		{
			name: "impressions would exceed",
			steps: []step{
				{item("a", 60, 10), true, false},
				{item("b", 41, 10), false, false},
			},
			batches: [][]string{{"a"}, {"b"}},
		},
		{
			name: "bytes would exceed",
			steps: []step{
				{item("a", 1, 600), true, false},
				{item("b", 1, 401), false, false},
				{item("c", 1, 399), true, false},
			},
			batches: [][]string{{"a"}, {"b", "c"}},
		},
		{
			name: "oversized item is sent alone",
			steps: []step{
				{item("a", 1, 10), true, false},
				{item("big", 5000, 10), false, true},
				{item("c", 1, 10), false, false},
			},
			batches: [][]string{{"a"}, {"big"}, {"c"}},
		},
		{
			name: "oversized bytes into an empty builder",
			steps: []step{
				{item("big", 1, 1<<20), true, true},
				{item("b", 0, 0), false, false},
			},
			batches: [][]string{{"big"}, {"b"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBuilder(t, limits)
			var got [][]string
			for i, s := range tt.steps {
				if f := b.Fits(s.it); f != s.fits {
					t.Fatalf("step %d: Fits(%s) = %v, want %v", i, s.it.ID, f, s.fits)
				}
				err := b.Add(s.it, t0)
				if s.fits != (err == nil) {
					t.Fatalf("step %d: Add(%s) = %v, want fits=%v", i, s.it.ID, err, s.fits)
				}
				if err != nil {
					if !errors.Is(err, ErrFull) {
						t.Fatalf("step %d: Add = %v, want ErrFull", i, err)
					}
					got = append(got, b.Take().IDs())
					if err := b.Add(s.it, t0); err != nil {
						t.Fatalf("step %d: Add to empty builder = %v", i, err)
					}
				}
				if full := b.Full(); full != s.fullThen {
					t.Fatalf("step %d: Full() = %v, want %v", i, full, s.fullThen)
				}
			}
			got = append(got, b.Take().IDs())
			if !slices.EqualFunc(got, tt.batches, slices.Equal) {
				t.Fatalf("batches = %v, want %v", got, tt.batches)
			}
		})
	}
}

func TestBuilderRejectsNegativeSizes(t *testing.T) {
	b := newBuilder(t, testLimits())
	for _, it := range []Item[int]{item("a", -1, 0), item("b", 0, -1)} {
		if err := b.Add(it, t0); !errors.Is(err, ErrInvalidItem) {
			t.Fatalf("Add(%+v) = %v, want ErrInvalidItem", it, err)
		}
	}
	if b.Len() != 0 {
		t.Fatalf("Len() = %d after rejected adds, want 0", b.Len())
	}
}

func TestBuilderLinger(t *testing.T) {
	b := newBuilder(t, Limits{MaxImpressions: 100, MaxBytes: 1000, Linger: time.Second})
	if _, ok := b.Deadline(); ok {
		t.Fatal("empty builder has a deadline")
	}
	if b.Due(t0.Add(time.Hour)) {
		t.Fatal("empty builder is due")
	}
	mustAdd(t, b, item("a", 1, 1), t0)
	mustAdd(t, b, item("b", 1, 1), t0.Add(900*time.Millisecond)) // does not extend the linger
	if d, _ := b.Deadline(); !d.Equal(t0.Add(time.Second)) {
		t.Fatalf("Deadline() = %v, want first add + linger", d)
	}
	tests := []struct {
		at   time.Duration
		want bool
	}{{0, false}, {999 * time.Millisecond, false}, {time.Second, true}, {time.Hour, true}}
	for _, tt := range tests {
		if got := b.Due(t0.Add(tt.at)); got != tt.want {
			t.Errorf("Due(+%v) = %v, want %v", tt.at, got, tt.want)
		}
	}

	got := b.Take()
	if got.Impressions != 2 || got.Bytes != 2 || !got.Opened.Equal(t0) || len(got.Items) != 2 {
		t.Fatalf("Take() = %+v", got)
	}
	if got.ID != WebhookID([]string{"a", "b"}) {
		t.Fatalf("batch id %q, want WebhookID of its ids", got.ID)
	}
	if b.Len() != 0 || b.Due(t0.Add(time.Hour)) {
		t.Fatal("builder not empty after Take")
	}
	// A full batch is due before its linger ends.
	mustAdd(t, b, item("c", 100, 1), t0)
	if !b.Due(t0) {
		t.Fatal("full batch is not due")
	}
	if z := newBuilder(t, testLimits()).Take(); z.ID != "" || z.Items != nil {
		t.Fatalf("Take() on empty builder = %+v, want zero", z)
	}
}

func TestTakeHandsOverItems(t *testing.T) {
	b := newBuilder(t, testLimits())
	mustAdd(t, b, Item[int]{ID: "a", Value: 1}, t0)
	first := b.Take()
	mustAdd(t, b, Item[int]{ID: "b", Value: 2}, t0)
	if first.Items[0].ID != "a" || first.Items[0].Value != 1 {
		t.Fatalf("taken batch changed by later adds: %+v", first.Items)
	}
}

func mustAdd(t *testing.T, b *Builder[int], it Item[int], now time.Time) {
	t.Helper()
	if err := b.Add(it, now); err != nil {
		t.Fatalf("Add(%s): %v", it.ID, err)
	}
}

func TestWebhookID(t *testing.T) {
	format := regexp.MustCompile(`^msg_[a-z2-7]{26}$`)
	tests := []struct {
		name   string
		a, b   []string
		sameID bool
	}{
		{"same ids", []string{"x", "y"}, []string{"x", "y"}, true},
		{"order does not matter", []string{"1", "2", "3"}, []string{"3", "1", "2"}, true},
		{"different set", []string{"x", "y"}, []string{"x", "z"}, false},
		{"subset", []string{"x", "y"}, []string{"x"}, false},
		{"concatenation", []string{"ab", "c"}, []string{"a", "bc"}, false},
		{"empty id", []string{"", "a"}, []string{"a"}, false},
		{"duplicate", []string{"a", "a"}, []string{"a"}, false},
		{"nil and empty", nil, []string{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := WebhookID(tt.a), WebhookID(tt.b)
			if (a == b) != tt.sameID {
				t.Fatalf("WebhookID(%q) = %s, WebhookID(%q) = %s, want same=%v", tt.a, a, tt.b, b, tt.sameID)
			}
			for _, id := range []string{a, b} {
				if !format.MatchString(id) {
					t.Fatalf("webhook id %q does not match %s", id, format)
				}
			}
		})
	}

	// Golden value: the id must never change between releases, or receivers
	// would see a retried batch as new.
	const golden = "msg_sghrkjs2nebyusy3nqgxxbmgim"
	if got, want := WebhookID([]string{"dest-1:1", "dest-1:2"}), golden; got != want {
		t.Fatalf("WebhookID changed: got %s, want %s", got, want)
	}

	ids := []string{"c", "a", "b"}
	WebhookID(ids)
	if !slices.Equal(ids, []string{"c", "a", "b"}) {
		t.Fatalf("WebhookID modified its argument: %v", ids)
	}
}

func BenchmarkBuilder(b *testing.B) {
	// 16 KiB messages of 100 impressions into the default limits: 50 messages
	// (limited by impressions) per batch, as in the measured floor relay.
	bl := newBuilder(b, testLimits())
	ids := make([]string, 1000)
	for i := range ids {
		ids[i] = fmt.Sprintf("imp.deliver.dest-%d:%d", i%7, i)
	}
	b.ReportAllocs()
	for i := range b.N {
		it := Item[int]{ID: ids[i%len(ids)], Impressions: 100, Bytes: 16 << 10, Value: i}
		if err := bl.Add(it, t0); errors.Is(err, ErrFull) {
			_ = bl.Take()
			_ = bl.Add(it, t0)
		}
	}
}

func BenchmarkWebhookID(b *testing.B) {
	for _, n := range []int{1, 50, 500} {
		ids := make([]string, n)
		for i := range ids {
			ids[i] = fmt.Sprintf("imp.deliver.dest-1:%d", i)
		}
		b.Run(fmt.Sprintf("ids=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				_ = WebhookID(ids)
			}
		})
	}
}

// testLimits are roomy limits for tests that are not about limits.
func testLimits() Limits {
	return Limits{MaxImpressions: 5000, MaxBytes: 1 << 20, Linger: 200 * time.Millisecond}
}
