-- Orthanc auto-routing rule: forward every stable CT series to the PE triage node ("agent" modality).
-- The whole series goes in one association (REST /modalities/{name}/store); outputs of the node itself
-- (SR, SC, SEG) are not CT and so are never sent back.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    print('Auto-routing CT series ' .. seriesId .. ' to the PE triage node')
    RestApiPost('/modalities/agent/store', seriesId)
  end
end
