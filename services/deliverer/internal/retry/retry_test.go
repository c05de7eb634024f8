package retry

import (
	"errors"
	"fmt"
	"math"
	"testing"
	"time"
)

func fixed(r float64) func() float64 { return func() float64 { return r } }

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*Policy)
		ok     bool
	}{
		{"default", func(*Policy) {}, true},
		{"zero base", func(p *Policy) { p.Base = 0 }, false},
		{"max below base", func(p *Policy) { p.Max = p.Base / 2 }, false},
		{"max equals base", func(p *Policy) { p.Max = p.Base }, true},
		{"huge max", func(p *Policy) { p.Max = 365 * 24 * time.Hour }, false},
		{"no attempts", func(p *Policy) { p.MaxAttempts = 0 }, false},
		{"zero age", func(p *Policy) { p.MaxAge = 0 }, false},
		{"negative retry-after cap", func(p *Policy) { p.RetryAfterCap = -time.Second }, false},
		{"zero retry-after cap", func(p *Policy) { p.RetryAfterCap = 0 }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := DefaultPolicy()
			tt.modify(&p)
			err := p.Validate()
			if tt.ok && err != nil {
				t.Fatalf("Validate() = %v, want nil", err)
			}
			if !tt.ok && !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("Validate() = %v, want ErrInvalidPolicy", err)
			}
		})
	}
}

func TestDelayBackoff(t *testing.T) {
	p := DefaultPolicy()
	ms := time.Millisecond
	tests := []struct {
		attempt  int
		low, max time.Duration // delay at rnd=0 and the bound at rnd→1
	}{
		{-3, 250 * ms, 500 * ms},
		{0, 250 * ms, 500 * ms},
		{1, 250 * ms, 500 * ms},
		{2, 500 * ms, 1000 * ms},
		{3, 1000 * ms, 2000 * ms},
		{6, 8 * time.Second, 16 * time.Second},
		{7, 15 * time.Second, 30 * time.Second},
		{12, 15 * time.Second, 30 * time.Second},
		{1000, 15 * time.Second, 30 * time.Second},
		{math.MaxInt, 15 * time.Second, 30 * time.Second},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("attempt %d", tt.attempt), func(t *testing.T) {
			if got := p.Delay(tt.attempt, 0, fixed(0)); got != tt.low {
				t.Errorf("Delay(%d, rnd=0) = %v, want %v", tt.attempt, got, tt.low)
			}
			hi := p.Delay(tt.attempt, 0, fixed(0.999999))
			if hi > tt.max || hi < tt.max-tt.max/1000 {
				t.Errorf("Delay(%d, rnd→1) = %v, want just below %v", tt.attempt, hi, tt.max)
			}
		})
	}
}

// TestDelayJitterBounds checks the contract over many random draws: every
// delay is within [Base, Max], within the equal-jitter band of its attempt, and
// the draws actually spread over the band.
func TestDelayJitterBounds(t *testing.T) {
	policies := map[string]Policy{
		"default":                DefaultPolicy(),
		"max equals base":        {Base: time.Second, Max: time.Second, MaxAttempts: 3, MaxAge: time.Minute},
		"max not a power of two": {Base: 100 * time.Millisecond, Max: 1500 * time.Millisecond, MaxAttempts: 5, MaxAge: time.Minute},
	}
	for name, p := range policies {
		t.Run(name, func(t *testing.T) {
			for attempt := 1; attempt <= 15; attempt++ {
				c := min(p.Base<<attempt, p.Max)
				lo, hi := max(c/2, p.Base), c
				seen := map[bool]int{} // lower half / upper half of the band
				for range 2000 {
					d := p.Delay(attempt, 0, nil)
					if d < lo || d > hi || d < p.Base || d > p.Max {
						t.Fatalf("attempt %d: Delay = %v, want in [%v, %v]", attempt, d, lo, hi)
					}
					seen[d >= lo+(hi-lo)/2]++
				}
				if lo < hi && (seen[false] == 0 || seen[true] == 0) {
					t.Fatalf("attempt %d: no spread over [%v, %v]: %v", attempt, lo, hi, seen)
				}
			}
		})
	}
}

func TestDelayRetryAfter(t *testing.T) {
	p := DefaultPolicy()
	tests := []struct {
		name       string
		attempt    int
		retryAfter time.Duration
		rnd        float64
		want       time.Duration
	}{
		{"shorter than backoff is ignored", 3, 100 * time.Millisecond, 0, time.Second},
		{"longer than backoff wins", 1, 10 * time.Second, 0, 10 * time.Second},
		{"jitter on top", 1, 10 * time.Second, 0.5, 10*time.Second + 500*time.Millisecond},
		{"above max backoff", 12, 2 * time.Minute, 0, 2 * time.Minute},
		{"capped", 1, 48 * time.Hour, 0, time.Hour},
		{"capped with jitter", 1, 48 * time.Hour, 0.5, time.Hour + 3*time.Minute},
		{"negative is ignored", 1, -time.Hour, 0, 250 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := p.Delay(tt.attempt, tt.retryAfter, fixed(tt.rnd))
			if got != tt.want {
				t.Fatalf("Delay(%d, %v) = %v, want %v", tt.attempt, tt.retryAfter, got, tt.want)
			}
		})
	}
	// Whatever the draw, a Retry-After under the cap is honoured in full.
	for range 1000 {
		if d := p.Delay(1, 5*time.Second, nil); d < 5*time.Second || d > 5500*time.Millisecond {
			t.Fatalf("Delay(1, 5s) = %v, want in [5s, 5.5s]", d)
		}
	}
}

func TestDelayClampsRandom(t *testing.T) {
	p := DefaultPolicy()
	for _, r := range []float64{-1, math.NaN(), 1, 7, math.Inf(1)} {
		if d := p.Delay(1, 0, fixed(r)); d < p.Base || d > 2*p.Base {
			t.Errorf("Delay with rnd=%v = %v, want in [%v, %v]", r, d, p.Base, 2*p.Base)
		}
	}
}

func TestExhausted(t *testing.T) {
	p := DefaultPolicy()
	first := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		attempt int
		age     time.Duration
		want    bool
	}{
		{"first failure", 1, 0, false},
		{"one attempt left", 11, 14 * time.Minute, false},
		{"attempts used", 12, time.Minute, true},
		{"beyond attempts", 40, time.Minute, true},
		{"too old", 2, 15 * time.Minute, true},
		{"clock went back", 2, -time.Hour, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := p.Exhausted(tt.attempt, first, first.Add(tt.age)); got != tt.want {
				t.Fatalf("Exhausted(%d, +%v) = %v, want %v", tt.attempt, tt.age, got, tt.want)
			}
		})
	}
}

func BenchmarkDelay(b *testing.B) {
	p := DefaultPolicy()
	for i := range b.N {
		_ = p.Delay(i%16, 0, nil)
	}
}
