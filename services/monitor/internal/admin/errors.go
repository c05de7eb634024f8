package admin

import (
	"context"
	"errors"
	"log/slog"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
)

// The admin API's domain errors. Handlers wrap them with what they are
// about (fmt.Errorf("destination %q: %w", id, errNotFound)); toStatus is
// the one place they become gRPC codes, and their message is shown to the
// caller as written.
var (
	// errNotFound: the destination (or tenant) does not exist.
	errNotFound = errors.New("not found")
	// errExists: a destination with that id exists already.
	errExists = errors.New("already exists")
	// errConflict: someone changed the record between our read and write.
	errConflict = errors.New("changed concurrently; read it again and retry")
	// errPrecondition: the destination is not in a state that allows it.
	errPrecondition = errors.New("not allowed in this state")
)

// toStatus maps err to the gRPC status the caller gets and logs its cause
// once: NATS and JetStream failures are retryable (Unavailable), a full
// stream is ResourceExhausted, the caller's own deadline or cancellation is
// passed on, a status built by a handler is kept, and anything else is
// Internal with its cause kept out of the answer.
func toStatus(log *slog.Logger, op string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, errNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, errExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, errConflict), errors.Is(err, registry.ErrConflict), wrongLastSequence(err):
		return status.Error(codes.Aborted, op+": "+errConflict.Error())
	case errors.Is(err, errPrecondition):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, op+": deadline exceeded")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, op+": canceled")
	case stream.IsFull(err):
		log.Warn(op, "err", err)
		return status.Error(codes.ResourceExhausted, op+": stream full, retry later")
	case transient(err):
		log.Warn(op, "err", err)
		return status.Error(codes.Unavailable, op+": store unavailable, retry")
	}
	log.Error(op, "err", err)
	return status.Error(codes.Internal, "internal error")
}

// wrongLastSequence reports a compare-and-set that lost to another writer.
func wrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence
}

// transient reports a NATS or JetStream failure worth retrying.
func transient(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrDisconnected) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, jetstream.ErrNoStreamResponse)
}
