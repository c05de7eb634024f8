package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/health"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// probeScan bounds how many parked batches a probe looks through for one to
// send.
const probeScan = 100

// probe sends one real parked batch to a PROBING destination: useful work,
// and proof the endpoint accepts our traffic. Delivered, the batch leaves
// PARKED. With no suitable batch parked, an empty batch is sent.
//
// A 4xx answer (other than 408/429) also ends the quarantine: the endpoint
// is up and answering, and the batch it refused stays parked for an
// operator. Otherwise one batch the receiver rejects would fail every probe
// and keep the destination quarantined for good (F3).
func (e *Engine) probe(ctx context.Context, m *health.Machine, d *eventv1.Decision) {
	dest := e.reg.Destination(d.GetDestinationId())
	if dest == nil {
		return
	}
	first := e.probeBatch(ctx, dest)
	var body []byte
	var err error
	id := "msg_probe_" + fmt.Sprint(time.Now().UnixNano())
	if first != nil {
		body, err = webhook.EncodeBody(first.Batch.GetImpressions())
		id = "msg_probe_" + first.Batch.GetBatchId()
	} else {
		body = []byte("[]")
	}
	var res webhook.Result
	if err == nil {
		res = e.send(ctx, dest, id, body)
		err = res.Err
	}
	delivered := err == nil
	if res.Class == eventv1.ErrorClass_ERROR_CLASS_CLIENT {
		e.log.Warn("probe batch refused; the endpoint answers, so the quarantine ends and the batch stays parked",
			"destination", dest.GetId(), "status", res.Status)
		err = nil
	}
	e.metrics.probes.WithLabelValues(boolLabel(err == nil)).Inc()
	if delivered && first != nil {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if derr := parked.Delete(dctx, e.js, first.Seq); derr != nil {
			e.log.Warn("probe batch delivered but still parked; it will be delivered again", "destination", dest.GetId(), "err", derr)
		}
		cancel()
	}
	e.publishProbeOutcome(ctx, dest, id, res)
	next, perr := m.ProbeResult(dest.GetId(), err, time.Now())
	if perr != nil {
		return // paused or resumed meanwhile
	}
	e.store(ctx, m, next)
}

// probeBatch returns the oldest batch parked because dest was held (not one
// it rejected or that ran out of retries: those would fail again) that fits
// dest's batch limit, looking at the first probeScan; nil when there is none.
func (e *Engine) probeBatch(ctx context.Context, dest *adminv1.Destination) *parked.Msg {
	limit := int(dest.GetMaxBatchImpressions())
	if limit <= 0 {
		limit = int(registry.DefaultDestination().MaxBatchImpressions)
	}
	var found *parked.Msg
	seen := 0
	errDone := errors.New("done")
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_ = parked.Each(pctx, e.js, dest.GetId(), parked.Range{}, 0, func(msg parked.Msg) error {
		if seen++; seen > probeScan {
			return errDone
		}
		if _, held := parked.HoldOf(msg.Batch.GetParkReason()); held && len(msg.Batch.GetImpressions()) <= limit {
			found = &msg
			return errDone
		}
		return nil
	})
	return found
}

func (e *Engine) send(ctx context.Context, dest *adminv1.Destination, id string, body []byte) webhook.Result {
	keys, err := webhook.SigningKeys(dest.GetSecret(), dest.GetPreviousSecret(), dest.GetPreviousSecretExpires().AsTime(), time.Now())
	if err != nil {
		return webhook.Result{Err: err, Class: eventv1.ErrorClass_ERROR_CLASS_OTHER}
	}
	return e.client.Send(ctx, webhook.Request{
		URL: dest.GetUrl(), ID: id, Body: body, Gzip: dest.GetGzip(), Secrets: keys,
		Timeout: dest.GetTimeout().AsDuration(), SuccessCodes: dest.GetSuccessCodes(),
	})
}

func (e *Engine) publishProbeOutcome(ctx context.Context, dest *adminv1.Destination, id string, res webhook.Result) {
	subj, err := topology.Outcome(dest.GetId())
	if err != nil {
		return
	}
	o := &eventv1.Outcome{
		DestinationId: dest.GetId(), TenantId: dest.GetTenantId(), WebhookId: id, At: timestamppb.Now(),
		StatusCode: int32(res.Status), ErrorClass: res.Class, LatencyMs: float64(res.Latency.Microseconds()) / 1000,
		TimeoutMs: float64(dest.GetTimeout().AsDuration().Milliseconds()), Attempt: 1, Probe: true,
	}
	if res.Err != nil {
		o.Error = res.Err.Error()
	}
	if b, err := proto.Marshal(o); err == nil {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, _ = e.js.Publish(pctx, subj, b)
		cancel()
	}
}

func boolLabel(ok bool) string {
	if ok {
		return "ok"
	}
	return "failed"
}
