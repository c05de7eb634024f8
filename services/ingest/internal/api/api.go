// Package api serves bulkhead.ingest.v1.IngestService: it authenticates the
// caller's API key, enforces batch and rate limits, and answers only after
// JetStream has stored the batch.
package api

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/ingest/internal/keys"
)

// Limits bound what one caller may submit.
type Limits struct {
	// MaxBatchBytes bounds one serialized batch.
	MaxBatchBytes int
	// TenantRate is impressions per second per tenant (0: unlimited), as
	// delivered: a batch is charged its impressions times Fanout(tenant).
	TenantRate float64
	// Fanout returns how many destinations the tenant has (nil: 1). Each
	// destination costs the pipeline a copy of every impression (routed,
	// stored, POSTed), so a tenant with 64 destinations uses 64 times the
	// capacity of one with one; the rate counts what it costs.
	Fanout func(tenant string) int
	// TenantBurst is how many impressions a tenant may submit at once.
	TenantBurst int
	// PublishTimeout bounds the wait for JetStream's acknowledgement.
	PublishTimeout time.Duration
	// MaxRecvMsgSize is the largest request gRPC reads (0: twice
	// MaxBatchBytes, so a batch somewhat over the limit is refused with an
	// InvalidArgument naming it, not gRPC's own error).
	MaxRecvMsgSize int
	// MaxInflightBytes bounds the request bytes calls may make ingest hold
	// at once (0: DefaultMaxInflightBytes); TenantInflightBytes bounds one
	// tenant's share of them (0: half of MaxInflightBytes).
	MaxInflightBytes    int64
	TenantInflightBytes int64
}

// DefaultMaxInflightBytes is half of the 512 MiB the deploy manifests give
// an ingest pod.
const DefaultMaxInflightBytes = 256 << 20

// submitMethod is the full name of Submit, which Admit charges more.
const submitMethod = ingestv1.IngestService_Submit_FullMethodName

// streamWindow is how many batches of one SubmitStream may await
// JetStream's acknowledgement at once.
const streamWindow = 256

// Server implements ingestv1.IngestServiceServer.
type Server struct {
	ingestv1.UnimplementedIngestServiceServer
	js      jetstream.JetStream
	keys    *keys.Store
	refused Refusals
	limits  Limits
	memory  *memory
	log     *slog.Logger
	metrics *metrics

	mu       sync.Mutex
	limiters map[string]*rate.Limiter
}

// Refusals names the tenants whose budgets are spent (an admission.View).
type Refusals interface {
	Refusal(tenant string) *eventv1.Refusal
}

// New returns a server publishing with js and refusing the tenants refused
// names (nil: none). The batch limit is lowered to
// what the connected NATS server can store, route and park as one message
// (stream.MaxBatchBytes), so a batch over it is refused for good rather
// than answered "retry" forever.
func New(js jetstream.JetStream, ks *keys.Store, refused Refusals, limits Limits, log *slog.Logger, reg prometheus.Registerer) (*Server, error) {
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	if mp := js.Conn().MaxPayload(); mp > 0 {
		if fit := stream.MaxBatchBytes(mp); limits.MaxBatchBytes <= 0 || limits.MaxBatchBytes > fit {
			log.Warn("max-batch-bytes lowered to fit the NATS server's max_payload", "max_payload", mp, "max_batch_bytes", fit)
			limits.MaxBatchBytes = fit
		}
	}
	if limits.MaxRecvMsgSize <= 0 {
		limits.MaxRecvMsgSize = 2 * limits.MaxBatchBytes
	}
	if limits.MaxInflightBytes <= 0 {
		limits.MaxInflightBytes = DefaultMaxInflightBytes
	}
	if limits.TenantInflightBytes <= 0 {
		limits.TenantInflightBytes = limits.MaxInflightBytes / 2
	}
	if need := int64(limits.MaxRecvMsgSize + limits.MaxBatchBytes); limits.TenantInflightBytes < need {
		return nil, fmt.Errorf("in-flight bytes per tenant %d cannot hold one Submit (%d)", limits.TenantInflightBytes, need)
	}
	return &Server{js: js, keys: ks, refused: refused, limits: limits, memory: newMemory(limits.MaxInflightBytes, limits.TenantInflightBytes), log: log, metrics: m, limiters: map[string]*rate.Limiter{}}, nil
}

// MaxRecvMsgSize is the largest request the gRPC server must accept.
func (s *Server) MaxRecvMsgSize() int { return s.limits.MaxRecvMsgSize }

type tenantKey struct{}

// Authenticate is the grpcserver.AuthFunc: the API key names the tenant.
func (s *Server) Authenticate(ctx context.Context, _ string, token string) (context.Context, error) {
	tenant, err := s.keys.Tenant(token)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, "unknown api key")
	}
	return context.WithValue(ctx, tenantKey{}, tenant), nil
}

func tenantFrom(ctx context.Context) (string, error) {
	t, ok := ctx.Value(tenantKey{}).(string)
	if !ok {
		return "", status.Error(codes.Unauthenticated, "no tenant for this call")
	}
	return t, nil
}

// Submit stores one batch and answers once JetStream has it.
func (s *Server) Submit(ctx context.Context, req *ingestv1.SubmitRequest) (*ingestv1.SubmitResponse, error) {
	tenant, err := tenantFrom(ctx)
	if err != nil {
		return nil, err
	}
	msg, batchID, err := s.prepare(tenant, req)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, s.limits.PublishTimeout)
	defer cancel()
	start := time.Now()
	ack, err := s.js.PublishMsg(pctx, msg)
	s.metrics.publish.Observe(time.Since(start).Seconds())
	return s.answer(tenant, batchID, len(req.GetImpressions()), ack, err)
}

// prepare checks limits and builds the JetStream message for a batch.
func (s *Server) prepare(tenant string, req *ingestv1.SubmitRequest) (*nats.Msg, string, error) {
	n := len(req.GetImpressions())
	if size := proto.Size(req); s.limits.MaxBatchBytes > 0 && size > s.limits.MaxBatchBytes {
		s.metrics.refused(tenant, "too_large", n)
		return nil, "", grpcserver.InvalidArgument("impressions", fmt.Sprintf("batch is %d bytes; the limit is %d", size, s.limits.MaxBatchBytes))
	}
	if s.refused != nil {
		if r := s.refused.Refusal(tenant); r != nil {
			s.metrics.refused(tenant, "budget", n)
			return nil, "", refusal(codes.ResourceExhausted, fmt.Sprintf("tenant %s is refused: %s; nothing was stored, retry later", tenant, r.GetDetail()),
				time.Duration(r.GetRetryAfterMs())*time.Millisecond, r.GetReason(), tenant, r.GetBudget())
		}
	}
	if lim := s.limiter(tenant); lim != nil {
		copies := 1
		if s.limits.Fanout != nil {
			copies = max(1, s.limits.Fanout(tenant))
		}
		// Never above the burst, or a batch to many destinations could
		// never be admitted at all.
		cost := min(n*copies, lim.Burst())
		if r := lim.ReserveN(time.Now(), cost); !r.OK() || r.Delay() > 0 {
			var wait time.Duration
			if r.OK() {
				wait = r.Delay()
				r.Cancel()
			} else {
				wait = time.Second
			}
			s.metrics.refused(tenant, "rate_limited", n)
			return nil, "", refusal(codes.ResourceExhausted, fmt.Sprintf("tenant %s is over its rate of %.0f delivered impressions/s (this batch: %d impressions to %d destinations)",
				tenant, s.limits.TenantRate, n, copies),
				wait, admission.ReasonRateLimited, tenant, nil)
		}
	}
	batchID := newBatchID(tenant, req.GetIdempotencyKey())
	subj, err := topology.In(tenant)
	if err != nil {
		return nil, "", status.Error(codes.Internal, "internal error")
	}
	data, err := proto.Marshal(&eventv1.Batch{
		BatchId:     batchID,
		TenantId:    tenant,
		AcceptedAt:  timestamppb.Now(),
		Impressions: req.GetImpressions(),
	})
	if err != nil {
		return nil, "", status.Error(codes.Internal, "internal error")
	}
	m := nats.NewMsg(subj)
	m.Data = data
	// JetStream de-duplicates on the message id: a retried batch is stored once.
	m.Header.Set(jetstream.MsgIDHeader, batchID)
	m.Header.Set(jetstream.ExpectedStreamHeader, topology.StreamImpressions)
	return m, batchID, nil
}

// answer maps a publish result to the caller's answer. A full stream is
// retryable; nothing was stored, so the caller must retry (invariant 1).
func (s *Server) answer(tenant, batchID string, n int, ack *jetstream.PubAck, err error) (*ingestv1.SubmitResponse, error) {
	if err != nil {
		return nil, s.publishError(tenant, n, err)
	}
	if ack.Duplicate {
		s.metrics.batches.WithLabelValues("duplicate").Inc()
	} else {
		s.metrics.batches.WithLabelValues("stored").Inc()
		s.metrics.impressions.WithLabelValues(tenant).Add(float64(n))
	}
	return &ingestv1.SubmitResponse{BatchId: batchID, Accepted: int32(n), Duplicate: ack.Duplicate}, nil
}

// publishError is the one place JetStream errors become gRPC codes.
func (s *Server) publishError(tenant string, n int, err error) error {
	switch {
	case stream.IsSubjectFull(err):
		// The tenant's own share of IMPRESSIONS: only this tenant waits.
		s.metrics.refused(tenant, "backlog_full", n)
		return refusal(codes.ResourceExhausted, fmt.Sprintf("tenant %s has its most batches waiting to be routed; nothing was stored, retry later", tenant),
			time.Second, admission.ReasonBacklogFull, tenant, nil)
	case stream.IsFull(err):
		s.metrics.refused(tenant, "store_full", n)
		s.log.Warn("impressions stream full; refusing", "tenant", tenant)
		return refusal(codes.ResourceExhausted, "impression store is full; nothing was stored, retry later",
			time.Second, admission.ReasonStoreFull, tenant, nil)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "canceled; the batch may or may not be stored, retry with the same idempotency key")
	default:
		s.metrics.refused(tenant, "unavailable", n)
		s.log.Warn("publish failed", "tenant", tenant, "err", err)
		return status.Error(codes.Unavailable, "impression store unavailable; retry with the same idempotency key")
	}
}

// refusal is a retryable refusal: code and message, a RetryInfo with wait,
// and an ErrorInfo naming the reason (admission.Reason*), the tenant and,
// when one is spent, the budget with its use and limit.
func refusal(code codes.Code, msg string, wait time.Duration, reason, tenant string, b *eventv1.Budget) error {
	info := &errdetails.ErrorInfo{Reason: reason, Domain: admission.Domain, Metadata: map[string]string{"tenant": tenant}}
	if b != nil {
		info.Metadata["resource"] = b.GetResource()
		info.Metadata["used"] = strconv.FormatInt(b.GetUsed(), 10)
		info.Metadata["limit"] = strconv.FormatInt(b.GetLimit(), 10)
	}
	st, err := status.New(code, msg).WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(wait)}, info)
	if err != nil {
		return status.Error(code, msg)
	}
	return st.Err()
}

func (s *Server) limiter(tenant string) *rate.Limiter {
	if s.limits.TenantRate <= 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.limiters[tenant]
	if !ok {
		l = rate.NewLimiter(rate.Limit(s.limits.TenantRate), s.limits.TenantBurst)
		s.limiters[tenant] = l
	}
	return l
}

// SubmitStream stores batches as they come and answers each one in order once
// stored. Up to streamWindow batches await their acknowledgement at once, so
// one stream can carry far more than one round trip per batch allows.
func (s *Server) SubmitStream(srv grpc.BidiStreamingServer[ingestv1.SubmitStreamRequest, ingestv1.SubmitStreamResponse]) error {
	ctx := srv.Context()
	tenant, err := tenantFrom(ctx)
	if err != nil {
		return err
	}
	window := make(chan streamed, streamWindow)
	recvErr := make(chan error, 1)
	go func() {
		defer close(window)
		for {
			var req ingestv1.SubmitStreamRequest
			err := srv.RecvMsg(&req)
			if errors.Is(err, io.EOF) {
				recvErr <- nil
				return
			}
			if err != nil {
				// Validation failures refuse that batch only; the stream goes on.
				if st, ok := status.FromError(err); ok && st.Code() == codes.InvalidArgument {
					window <- streamed{seq: req.GetSequence(), err: err}
					continue
				}
				recvErr <- err
				return
			}
			f := streamed{seq: req.GetSequence(), n: len(req.GetBatch().GetImpressions())}
			msg, batchID, perr := s.prepare(tenant, req.GetBatch())
			if perr == nil {
				// Wait for room: the stream stops reading meanwhile.
				if f.release, perr = s.memory.hold(ctx, tenant, int64(len(msg.Data))); perr != nil {
					recvErr <- perr
					return
				}
			}
			if perr != nil {
				f.err = perr
			} else {
				f.batchID = batchID
				f.fut, f.err = s.js.PublishMsgAsync(msg)
				if f.err != nil {
					f.err = s.publishError(tenant, f.n, f.err)
				}
			}
			select {
			case window <- f:
			case <-ctx.Done():
				f.free()
				recvErr <- ctx.Err()
				return
			}
		}
	}()
	for f := range window {
		resp := &ingestv1.SubmitStreamResponse{Sequence: f.seq}
		err := f.err
		if err == nil {
			var ack *jetstream.PubAck
			select {
			case ack = <-f.fut.Ok():
			case perr := <-f.fut.Err():
				err = s.publishError(tenant, f.n, perr)
			case <-time.After(s.limits.PublishTimeout):
				err = s.publishError(tenant, f.n, context.DeadlineExceeded)
			}
			if err == nil {
				resp.Result, err = s.answer(tenant, f.batchID, f.n, ack, nil)
			}
		}
		if err != nil {
			st := status.Convert(err)
			resp.ErrorCode, resp.ErrorMessage = int32(st.Code()), st.Message()
		}
		err = srv.Send(resp)
		f.free()
		if err != nil {
			// Drain so the reader is not blocked; the client is gone.
			for f := range window {
				f.free()
			}
			return err
		}
	}
	return <-recvErr
}

// streamed is one batch of a SubmitStream between its read and its answer.
type streamed struct {
	seq     uint64
	n       int
	batchID string
	fut     jetstream.PubAckFuture
	err     error
	release func() // the batch's bytes, held until it is answered
}

// free gives the batch's bytes back; it may be called more than once.
func (f streamed) free() {
	if f.release != nil {
		f.release()
	}
}

// newBatchID derives the id from the idempotency key when there is one, so a
// retried Submit carries the same JetStream message id and is stored once.
func newBatchID(tenant, idempotencyKey string) string {
	if idempotencyKey != "" {
		h := sha256.Sum256([]byte(tenant + "\x00" + idempotencyKey))
		return "b_" + hex.EncodeToString(h[:12])
	}
	var b [12]byte
	_, _ = rand.Read(b[:])
	return "b_" + hex.EncodeToString(b[:])
}
