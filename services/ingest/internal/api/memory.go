package api

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc/codes"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
)

// memory is ingest's budget of request bytes: what calls may make the
// process hold at once, in all and per tenant, so no caller can make
// ingest run out of memory and no tenant can take the whole budget. A
// call reserves the most its request can take before gRPC reads it
// (Admit); a stream also holds each batch it has sent to JetStream until
// the acknowledgement (hold), which waits for room: the stream stops
// reading, and HTTP/2 flow control slows the client.
type memory struct {
	total     *semaphore.Weighted
	perTenant int64

	mu      sync.Mutex
	tenants map[string]*semaphore.Weighted
}

func newMemory(total, perTenant int64) *memory {
	return &memory{total: semaphore.NewWeighted(total), perTenant: min(perTenant, total), tenants: map[string]*semaphore.Weighted{}}
}

func (m *memory) tenant(t string) *semaphore.Weighted {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.tenants[t]
	if !ok {
		s = semaphore.NewWeighted(m.perTenant)
		m.tenants[t] = s
	}
	return s
}

// tryHold takes n bytes for tenant now, or reports false.
func (m *memory) tryHold(tenant string, n int64) (func(), bool) {
	ts := m.tenant(tenant)
	if !ts.TryAcquire(n) {
		return nil, false
	}
	if !m.total.TryAcquire(n) {
		ts.Release(n)
		return nil, false
	}
	var once sync.Once
	return func() { once.Do(func() { m.total.Release(n); ts.Release(n) }) }, true
}

// hold takes n bytes for tenant, waiting for room until ctx ends.
func (m *memory) hold(ctx context.Context, tenant string, n int64) (func(), error) {
	ts := m.tenant(tenant)
	if err := ts.Acquire(ctx, n); err != nil {
		return nil, err
	}
	if err := m.total.Acquire(ctx, n); err != nil {
		ts.Release(n)
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(func() { m.total.Release(n); ts.Release(n) }) }, nil
}

// busyRetry is the delay a caller refused for memory is advised to wait:
// calls in flight end within a publish timeout, most within milliseconds.
const busyRetry = 100 * time.Millisecond

// Admit is the grpcserver admission hook: it reserves, before gRPC reads
// the request, the most the call can make ingest hold: for Submit the
// largest request gRPC accepts plus the stored batch built from it; for
// SubmitStream one request (the batches it holds afterwards wait in hold).
// A tenant or the process at its budget is refused with ResourceExhausted
// and reason INGEST_BUSY; nothing of the call was read.
func (s *Server) Admit(ctx context.Context, method string) (func(), error) {
	tenant, err := tenantFrom(ctx)
	if err != nil {
		return nil, err
	}
	n := int64(s.limits.MaxRecvMsgSize)
	if method == submitMethod {
		n += int64(s.limits.MaxBatchBytes)
	}
	release, ok := s.memory.tryHold(tenant, n)
	if !ok {
		s.metrics.refused(tenant, "busy", 0)
		return nil, refusal(codes.ResourceExhausted, fmt.Sprintf("ingest holds its most request bytes (tenant %s at most %d of %d); nothing was read, retry shortly",
			tenant, s.memory.perTenant, s.limits.MaxInflightBytes), busyRetry, admission.ReasonIngestBusy, tenant, nil)
	}
	return release, nil
}
