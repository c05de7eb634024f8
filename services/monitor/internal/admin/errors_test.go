package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bulkhead-io/bulkhead/pkg/registry"
)

// TestToStatus is the admin API's error table: each kind of failure gets
// its code, and a NATS timeout is never reported as a conflict.
func TestToStatus(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct {
		name string
		err  error
		want codes.Code
	}{
		{"not found", fmt.Errorf("destination %q: %w", "d", errNotFound), codes.NotFound},
		{"exists", fmt.Errorf("destination %q: %w", "d", errExists), codes.AlreadyExists},
		{"lost compare-and-set", &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamWrongLastSequence}, codes.Aborted},
		{"decision conflict", registry.ErrConflict, codes.Aborted},
		{"precondition", fmt.Errorf("paused: %w", errPrecondition), codes.FailedPrecondition},
		{"nats timeout", fmt.Errorf("update: %w", nats.ErrTimeout), codes.Unavailable},
		{"no responders", nats.ErrNoResponders, codes.Unavailable},
		{"jetstream api error", &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "jetstream temporarily unavailable"}, codes.Unavailable},
		{"stream full", &jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "maximum bytes exceeded"}, codes.ResourceExhausted},
		{"caller deadline", context.DeadlineExceeded, codes.DeadlineExceeded},
		{"handler status", status.Error(codes.PermissionDenied, "no"), codes.PermissionDenied},
		{"anything else", errors.New("proto: cannot encode"), codes.Internal},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := toStatus(log, "op", c.err)
			if status.Code(got) != c.want {
				t.Fatalf("toStatus(%v) = %v, want %v", c.err, got, c.want)
			}
			if c.want == codes.Internal && status.Convert(got).Message() != "internal error" {
				t.Fatalf("internal cause leaked: %q", status.Convert(got).Message())
			}
		})
	}
	if toStatus(log, "op", nil) != nil {
		t.Fatal("toStatus(nil) is not nil")
	}
}
