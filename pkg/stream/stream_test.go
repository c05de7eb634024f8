package stream

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestEnsureIsIdempotent(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 0; i < 2; i++ {
		if err := Ensure(ctx, js, Limits{}); err != nil {
			t.Fatalf("Ensure #%d: %v", i+1, err)
		}
	}
	for _, cfg := range Streams(Limits{}) {
		s, err := js.Stream(ctx, cfg.Name)
		if err != nil {
			t.Fatalf("stream %s: %v", cfg.Name, err)
		}
		if cfg.Name != topology.StreamOutcomes && s.CachedInfo().Config.Discard != jetstream.DiscardNew {
			t.Errorf("%s: discard = %v, want new", cfg.Name, s.CachedInfo().Config.Discard)
		}
	}
	for _, b := range []string{topology.BucketDestinations, topology.BucketQuarantine, topology.BucketLeases} {
		if _, err := js.KeyValue(ctx, b); err != nil {
			t.Errorf("bucket %s: %v", b, err)
		}
	}
}

func TestFullStreamRefusesAndIsFull(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Ensure(ctx, js, Limits{ImpressionsMaxBytes: 4096}); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 1000)
	var err error
	stored := 0
	for i := 0; i < 10 && err == nil; i++ {
		if _, err = js.Publish(ctx, "imp.in.t1", payload); err == nil {
			stored++
		}
	}
	if err == nil {
		t.Fatal("a 4 KiB stream accepted 10 KiB")
	}
	if !IsFull(err) {
		t.Fatalf("IsFull(%v) = false", err)
	}
	info, ierr := js.Stream(ctx, topology.StreamImpressions)
	if ierr != nil {
		t.Fatal(ierr)
	}
	if got := info.CachedInfo().State.Msgs; got != uint64(stored) {
		t.Errorf("stream holds %d messages, %d were acknowledged", got, stored)
	}
	if IsFull(context.DeadlineExceeded) {
		t.Error("IsFull(deadline) = true")
	}
}

func TestConcurrentEnsure(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := make(chan error, 8)
	for range 8 {
		go func() { errs <- Ensure(ctx, js, Limits{}) }()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent Ensure: %v", err)
		}
	}
	// A changed limit is applied to the existing stream.
	if err := Ensure(ctx, js, Limits{ParkedMaxAge: 10 * 24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, topology.StreamParked)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().Config.MaxAge; got != 10*24*time.Hour {
		t.Errorf("PARKED max age %v after Ensure with 240h", got)
	}
}

// TestEnsureNeverShrinksUnasked starts "a service" with a shorter export
// window and a smaller PARKED: Ensure refuses, and the parked data's
// retention is unchanged; with AllowShrink the owner may lower them.
func TestEnsureNeverShrinksUnasked(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := Ensure(ctx, js, Limits{}); err != nil {
		t.Fatal(err)
	}
	for _, l := range []Limits{{ParkedMaxAge: time.Hour}, {ParkedMaxBytes: 1 << 20}} {
		if err := Ensure(ctx, js, l); !errors.Is(err, ErrShrink) {
			t.Fatalf("Ensure(%+v) = %v, want ErrShrink", l, err)
		}
	}
	s, err := js.Stream(ctx, topology.StreamParked)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().Config; got.MaxAge != DefaultLimits().ParkedMaxAge || got.MaxBytes != DefaultLimits().ParkedMaxBytes {
		t.Fatalf("PARKED changed to max age %v, max bytes %d", got.MaxAge, got.MaxBytes)
	}
	// Growing needs no permission; shrinking needs AllowShrink.
	if err := Ensure(ctx, js, Limits{ParkedMaxAge: 30 * 24 * time.Hour}); err != nil {
		t.Fatalf("growing the export window: %v", err)
	}
	if err := Ensure(ctx, js, Limits{ParkedMaxAge: time.Hour, AllowShrink: true}); err != nil {
		t.Fatalf("shrinking with AllowShrink: %v", err)
	}
}

// TestAwaitWaitsForTheOwner: a service that does not own the streams waits
// until the owner has created them, and changes nothing.
func TestAwaitWaitsForTheOwner(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Await(ctx, js, nil) }()
	select {
	case err := <-done:
		t.Fatalf("Await returned before any stream existed: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := Ensure(ctx, js, Limits{}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Await: %v", err)
	}
	short, scancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer scancel()
	if err := Await(short, js, nil); err != nil {
		t.Fatalf("Await with everything there: %v", err)
	}
}

// TestSubjectBudgetRefusesOnlyItsSubject: one destination at its DELIVERY
// budget is refused (IsSubjectFull, not IsFull), another destination is
// still stored, and acknowledging frees the budget (a work queue's subject
// count is its backlog).
func TestSubjectBudgetRefusesOnlyItsSubject(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Ensure(ctx, js, Limits{DestinationBacklog: 3}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := js.Publish(ctx, "imp.deliver.full", []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := js.Publish(ctx, "imp.deliver.full", []byte("over"))
	if !IsSubjectFull(err) || IsFull(err) {
		t.Fatalf("fourth batch: %v; want IsSubjectFull and not IsFull", err)
	}
	if _, err := js.Publish(ctx, "imp.deliver.other", []byte("x")); err != nil {
		t.Fatalf("another destination refused: %v", err)
	}
	cons, err := js.CreateConsumer(ctx, topology.StreamDelivery, jetstream.ConsumerConfig{
		AckPolicy: jetstream.AckExplicitPolicy, FilterSubject: "imp.deliver.full",
	})
	if err != nil {
		t.Fatal(err)
	}
	m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DoubleAck(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "imp.deliver.full", []byte("room again")); err != nil {
		t.Fatalf("after one ack: %v", err)
	}
	if IsSubjectFull(nil) || IsSubjectFull(context.DeadlineExceeded) {
		t.Error("IsSubjectFull of a non-limit error")
	}
}

// TestEnsureLowersSubjectBudgetOnlyWhenItFits: a lower per-subject limit
// that a subject already exceeds would make JetStream delete its oldest
// batches, so Ensure refuses it unasked; one every subject fits is applied.
func TestEnsureLowersSubjectBudgetOnlyWhenItFits(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Ensure(ctx, js, Limits{}); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := js.Publish(ctx, "imp.parked.d1", []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := Ensure(ctx, js, Limits{DestinationParked: 4}); !errors.Is(err, ErrShrink) {
		t.Fatalf("lowering under a subject's count: %v, want ErrShrink", err)
	}
	if err := Ensure(ctx, js, Limits{DestinationParked: 5}); err != nil {
		t.Fatalf("lowering to what every subject fits: %v", err)
	}
	s, err := js.Stream(ctx, topology.StreamParked)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo(); got.Config.MaxMsgsPerSubject != 5 || got.State.Msgs != 5 {
		t.Fatalf("PARKED: per-subject limit %d, %d messages; want 5, 5", got.Config.MaxMsgsPerSubject, got.State.Msgs)
	}
}
