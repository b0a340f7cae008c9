-- Orthanc auto-routing rule: forward every stable CT series to the PE triage node ("agent" modality).
-- Outputs of the node itself (SR, SC, SEG) are not CT and so are never sent back.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    print('Auto-routing CT series ' .. seriesId .. ' to the PE triage node')
    SendToModality(seriesId, 'agent')
  end
end
